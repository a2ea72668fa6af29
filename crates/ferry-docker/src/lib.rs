//! a small Docker Engine API client and the inspect-to-create mapping
