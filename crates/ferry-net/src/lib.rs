//! network side of a migration: lock rules, ARP switch, gratuitous ARP
