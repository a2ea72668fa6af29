//! mutual-TLS PKI and connection setup for ferry agents
