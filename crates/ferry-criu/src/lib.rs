//! runs runc and CRIU: checkpoint, feature checks, log quoting
