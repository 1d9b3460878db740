//! Fuzzes the edge proxy's path handling with arbitrary bytes (read as UTF-8, invalid
//! sequences replaced): `core::route::parse`, `rewrite_location` (id `i-0123456789abcdef0`,
//! upstream `127.0.0.1:4000`), `rewrite_set_cookie` and `InstanceId::parse`. None may panic,
//! and: a parsed `Instance { id, rest }` has a valid id and a `rest` starting with `/` that
//! rebuild the path; an `InstanceRoot` is exactly `/<id>`; `Other` never hides an instance
//! id in the first segment; a rewritten `Location` lies under `/<id>` and is left alone when
//! rewritten again; a root-relative `Location` is only left alone when under the prefix; a
//! rewritten `Set-Cookie` carries `Path=/<id>/` and is stable; `InstanceId::parse` agrees
//! with `is_instance_id` and its errors are short. The checks live in tests/fuzz_corpus.rs,
//! which replays this target's corpus under `cargo test`. Until the known `rewrite_set_cookie`
//! char-boundary panic is fixed, inputs that would hit it skip the cookie check here (see
//! `skip_known_set_cookie_panic` there and fuzz/README.md).
#![no_main]

#[allow(dead_code)]
#[path = "../../tests/fuzz_corpus.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_route(data));
