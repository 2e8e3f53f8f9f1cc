//! The `standard-webhooks` kind's verifier on arbitrary requests (see common/mod.rs for the
//! input layout and the invariants).
#![no_main]

mod common;

use hookrelay::verify::standard;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| common::run(&standard::KIND, data));
