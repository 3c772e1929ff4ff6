//! End-to-end test support: the VM test host probe and helpers shared by the VM tests.
#![warn(missing_docs)]
