//! Issue 10, "fail closed": one submodule per part of the list.

mod sweeps;
