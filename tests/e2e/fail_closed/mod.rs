//! Issue 10, "fail closed": never delete the wrong data, never report erased what is not,
//! never crash on a spec. One submodule per part of the issue.

mod spec;
