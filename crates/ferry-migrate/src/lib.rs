//! the migration state machine and the traits its sides implement
