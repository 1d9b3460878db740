//! The proxy's per-request work outside Pingora: parse the path, find the instance among
//! 100,000 in the same cache the proxy reads, compute the upstream path, decide whether the
//! request is activity; and the `Location` and `Set-Cookie` rewrites of a redirect.
//!
//! Run: `cargo bench --bench routing`.

use std::hint::black_box;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use rstudio_pool::config::{Config, EMBEDDED_DEFAULT};
use rstudio_pool::core::ids::InstanceId;
use rstudio_pool::core::route::{
    is_user_activity, parse, rewrite_location, rewrite_set_cookie, upstream_path, Target,
};
use rstudio_pool::manager::{upstream_cache, Stage, Upstream};

fn routing(c: &mut Criterion) {
    // The rstudio purpose exactly as the embedded default configures it.
    let config =
        Config::from_yaml(EMBEDDED_DEFAULT, &|_| None).expect("the embedded default is valid");
    let purpose = Arc::new(config.purposes["rstudio"].clone());
    let cache = upstream_cache();
    let ids: Vec<InstanceId> = (0..100_000u128)
        .map(|n| InstanceId::from_bits(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
        .collect();
    for (n, id) in ids.iter().enumerate() {
        cache.insert(
            id.clone(),
            Arc::new(Upstream {
                id: id.clone(),
                host_header: None,
                socket: None,
                root_path: None,
                purpose: Arc::clone(&purpose),
                address: Some(format!("10.0.{}.{}:8787", n / 250, n % 250)),
                owner: None,
                ready: true,
                stage: Stage::Ready,
                since_ms: 0,
                activity: Arc::new(AtomicU64::new(0)),
            }),
        );
    }
    let path = format!("/{}/rpc/console_input", ids[77_777]);
    let query = Some("session=abc&x=%2F");

    c.bench_function(
        "route: parse + lookup in 100k + upstream path + activity",
        |b| {
            b.iter(|| {
                let path = black_box(path.as_str());
                let Target::Instance { id, rest } = parse(path) else {
                    unreachable!()
                };
                let id = InstanceId::parse(id).unwrap();
                let upstream = cache.get(&id).unwrap();
                let counts = is_user_activity("POST", rest, &upstream.purpose.keepalive_paths);
                let target =
                    upstream_path(path, rest, black_box(query), upstream.purpose.strip_prefix);
                black_box((counts, target))
            })
        },
    );

    c.bench_function("route: parse only", |b| {
        b.iter(|| black_box(parse(black_box(path.as_str()))))
    });

    let id = ids[5].as_str().to_owned();
    let hosts = ["10.0.0.5:8787", "10.0.0.5:8787"];
    c.bench_function("rewrite: Location to the upstream", |b| {
        b.iter(|| {
            black_box(rewrite_location(
                black_box("http://10.0.0.5:8787/auth-sign-in?appUri=%2F"),
                &id,
                &hosts,
            ))
        })
    });
    let under = format!("/{id}/landed");
    c.bench_function("rewrite: Location already under the prefix", |b| {
        b.iter(|| black_box(rewrite_location(black_box(&under), &id, &hosts)))
    });
    c.bench_function("rewrite: Set-Cookie scoped to /", |b| {
        b.iter(|| {
            black_box(rewrite_set_cookie(
                black_box("csrf-token=abc; Path=/; HttpOnly"),
                &id,
            ))
        })
    });
}

criterion_group!(benches, routing);
criterion_main!(benches);
