//! the ferry agent: serves check/migrate, runs the source and target sides
