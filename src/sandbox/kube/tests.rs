//! Handle-level tests: the controller driven in process, no HTTP.
