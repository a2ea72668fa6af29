//! local multi-host Docker test bed in network namespaces
