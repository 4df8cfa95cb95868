//! NBD server (stub).
