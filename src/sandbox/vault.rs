//! placeholder, see the sandbox issue
