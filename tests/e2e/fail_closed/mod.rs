//! Issue 10, "fail closed": each module proves one group of items on the real servers.

mod credentials;
