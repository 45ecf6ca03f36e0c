#![no_std]
//! The XDP program lives in main.rs; this empty lib lets forwarder-user depend on the crate.
