//! The Redis rate limiter and the LLM limits on top of it, against a real Redis: limits hold
//! under concurrency, charges are all-or-nothing, answers match time, keys expire, scripts
//! survive a flush, and each fail mode does what it says when Redis is unreachable.

use crate::{helpers::TestRedis, proxy::FaultProxy};
use callcoach::{
    http::leases::{LEASE_LIFETIME, Leases},
    llm::limits::{
        AcquireError, FleetLimiter, FleetLimits, FleetOptions, Limit, Quota, RateLimitHeaders,
        SpendBudgets, SpendGuard, SpendOptions, SpendWindow,
    },
    rate_limit::{Bucket, Decision, FailMode, LimiterOptions, RateLimitError, RateLimiter, Source},
};
use chrono::Utc;
use futures::future::join_all;
use redis::AsyncCommands;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A name no other test uses.
fn unique(what: &str) -> String {
    format!("test:{}:{what}", Uuid::new_v4().simple())
}

fn conn(url: &str) -> redis::aio::ConnectionManager {
    let env = [
        ("DATABASE_URL", "postgres://unused@127.0.0.1/unused"),
        ("REDIS_URL", url),
    ];
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let settings = callcoach::config::Settings::from_map(&env).unwrap();
    callcoach::redis_connection(&settings, 16).unwrap()
}

fn limiter(url: &str, fail_mode: FailMode) -> RateLimiter {
    let options = LimiterOptions {
        timeout: Duration::from_secs(2),
        fail_mode,
    };
    RateLimiter::new(conn(url), options)
}

const LOCAL: FailMode = FailMode::LocalShare { processes: 1 };

/// A URL where nothing listens.
fn closed_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    format!("redis://127.0.0.1:{port}/0")
}

async fn charge(limiter: &RateLimiter, bucket: &Bucket, cost: f64) -> Decision {
    limiter.charge(&[(bucket.clone(), cost)]).await.unwrap()
}

async fn pttl(redis: &TestRedis, key: &str) -> i64 {
    redis.conn().await.pttl(key).await.unwrap()
}

/// Ten workers, each with its own connection, take one token at a time from a bucket as fast
/// as they can: the grants never exceed capacity + refill × elapsed, and nearly reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_workers_never_get_more_than_the_bucket_allows() {
    let redis = TestRedis::start().await;
    let bucket = Bucket::new(&unique("hammer"), 20.0, 10.0).unwrap();
    let run_for = Duration::from_millis(2500);
    let started = Instant::now();
    let workers = (0..10).map(|_| {
        let (limiter, bucket) = (limiter(&redis.url(), LOCAL), bucket.clone());
        tokio::spawn(async move {
            let mut granted = 0u32;
            while started.elapsed() < run_for {
                let d = charge(&limiter, &bucket, 1.0).await;
                assert_eq!(d.source, Source::Redis, "no fallback under load");
                if d.allowed {
                    granted += 1;
                } else {
                    tokio::time::sleep(d.wait.min(Duration::from_millis(5))).await;
                }
            }
            granted
        })
    });
    let granted: u32 = join_all(workers)
        .await
        .into_iter()
        .map(|g| g.unwrap())
        .sum();
    let elapsed = started.elapsed().as_secs_f64();
    let most = 20.0 + 10.0 * elapsed;
    assert!(f64::from(granted) <= most, "{granted} grants > {most:.1}");
    assert!(
        f64::from(granted) >= 20.0 + 10.0 * (elapsed - 0.5),
        "only {granted} grants in {elapsed:.2}s: the limiter refuses too much"
    );
}

/// The same through the LLM limiter: ten worker processes share requests/min.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_fleet_limiters_stay_within_the_configured_requests_per_minute() {
    let redis = TestRedis::start().await;
    let limits = FleetLimits {
        requests_per_min: 120,
        input_tokens_per_min: 600_000,
        output_tokens_per_min: 600_000,
    };
    let options = FleetOptions {
        processes: 10,
        max_wait: Duration::from_millis(300),
        timeout: Duration::from_secs(2),
        name: unique("fleet"),
    };
    let run_for = Duration::from_secs(2);
    let started = Instant::now();
    let workers = (0..10).map(|_| {
        let fleet = FleetLimiter::new(conn(&redis.url()), limits, &options).unwrap();
        tokio::spawn(async move {
            let mut granted = 0u32;
            while started.elapsed() < run_for {
                match fleet.acquire(1_000, 500).await {
                    Ok(r) => {
                        granted += 1;
                        fleet.settle(r, 1_000, 500).await;
                    }
                    Err(AcquireError::Throttled { limit, .. }) => {
                        assert_eq!(limit, Limit::Requests);
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            granted
        })
    });
    let granted: u32 = join_all(workers)
        .await
        .into_iter()
        .map(|g| g.unwrap())
        .sum();
    let most = 120.0 + 2.0 * started.elapsed().as_secs_f64();
    assert!(f64::from(granted) <= most, "{granted} > {most:.1}");
    assert!(granted >= 120, "the burst is available: {granted}");
}

/// A charge over two buckets takes from both or from neither.
#[tokio::test]
async fn a_multi_bucket_charge_is_all_or_nothing() {
    let redis = TestRedis::start().await;
    let rl = limiter(&redis.url(), LOCAL);
    let a = Bucket::new(&unique("a"), 10.0, 0.001).unwrap();
    let b = Bucket::new(&unique("b"), 5.0, 1.0).unwrap();
    let both = rl
        .charge(&[(a.clone(), 3.0), (b.clone(), 5.0)])
        .await
        .unwrap();
    assert!(both.allowed);
    assert_levels(&both.levels, &[7.0, 0.0]);
    let refused = rl
        .charge(&[(a.clone(), 3.0), (b.clone(), 2.0)])
        .await
        .unwrap();
    assert!(!refused.allowed, "b is empty");
    assert_near(refused.wait, Duration::from_secs(2), 50);
    let a_alone = rl.available_in(&[(a.clone(), 7.0)]).await.unwrap();
    assert!(a_alone.allowed, "a was not charged: {a_alone:?}");
    assert!(!rl.available_in(&[(a, 7.5)]).await.unwrap().allowed);
}

/// `available_in` says when the tokens are there; charging just before is refused, just
/// after allowed.
#[tokio::test]
async fn available_in_matches_what_charging_finds() {
    let redis = TestRedis::start().await;
    let rl = limiter(&redis.url(), LOCAL);
    let bucket = Bucket::new(&unique("when"), 10.0, 5.0).unwrap();
    assert!(charge(&rl, &bucket, 10.0).await.allowed);
    let answer = rl.available_in(&[(bucket.clone(), 5.0)]).await.unwrap();
    assert!(!answer.allowed);
    assert_near(answer.wait, Duration::from_secs(1), 50);
    tokio::time::sleep(answer.wait.saturating_sub(Duration::from_millis(200))).await;
    assert!(!charge(&rl, &bucket, 5.0).await.allowed, "too early");
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(charge(&rl, &bucket, 5.0).await.allowed, "due by now");
}

/// Every write sets an expiry covering a full refill plus the margin.
#[tokio::test]
async fn bucket_keys_always_expire() {
    let redis = TestRedis::start().await;
    let rl = limiter(&redis.url(), LOCAL);
    let bucket = Bucket::new(&unique("ttl"), 10.0, 1.0).unwrap();
    charge(&rl, &bucket, 4.0).await;
    let ttl = pttl(&redis, bucket.key()).await;
    assert!(
        (4_000..=5_000).contains(&ttl),
        "4 s to refill + 1 s margin: {ttl}"
    );
    rl.adjust(&[(bucket.clone(), 20.0)]).await.unwrap();
    let ttl = pttl(&redis, bucket.key()).await;
    assert!((24_000..=25_000).contains(&ttl), "level -14 → 24 s: {ttl}");
    rl.clamp(&[(bucket.clone(), 0.0)]).await.unwrap();
    assert!(pttl(&redis, bucket.key()).await > 0);
    let peeked = Bucket::new(&unique("peek"), 10.0, 1.0).unwrap();
    rl.available_in(&[(peeked.clone(), 1.0)]).await.unwrap();
    assert_eq!(
        pttl(&redis, peeked.key()).await,
        -2,
        "a peek writes nothing"
    );
}

/// A positive adjustment is forced below zero and makes later callers wait; a refund stops
/// at the capacity.
#[tokio::test]
async fn adjust_forces_overdrafts_and_caps_refunds() {
    let redis = TestRedis::start().await;
    let rl = limiter(&redis.url(), LOCAL);
    let bucket = Bucket::new(&unique("adjust"), 10.0, 10.0).unwrap();
    let d = rl.adjust(&[(bucket.clone(), 15.0)]).await.unwrap();
    assert_levels(&d.levels, &[-5.0]);
    let wait = rl
        .available_in(&[(bucket.clone(), 1.0)])
        .await
        .unwrap()
        .wait;
    assert_near(wait, Duration::from_millis(600), 50);
    let d = rl.adjust(&[(bucket.clone(), -100.0)]).await.unwrap();
    assert_levels(&d.levels, &[10.0]);
}

/// After `SCRIPT FLUSH` (or a Redis restart) the script is loaded again by itself.
#[tokio::test]
async fn charges_work_after_script_flush() {
    let redis = TestRedis::start().await;
    let rl = limiter(&redis.url(), LOCAL);
    let bucket = Bucket::new(&unique("flush"), 10.0, 0.001).unwrap();
    assert!(charge(&rl, &bucket, 3.0).await.allowed);
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    let d = charge(&rl, &bucket, 3.0).await;
    assert_eq!(d.source, Source::Redis);
    assert_levels(&d.levels, &[4.0]);
}

/// A cost no bucket state could ever allow is an error, not an endless wait.
#[tokio::test]
async fn a_cost_above_capacity_is_an_error() {
    let redis = TestRedis::start().await;
    let rl = limiter(&redis.url(), LOCAL);
    let bucket = Bucket::new(&unique("big"), 10.0, 1.0).unwrap();
    let too_big = [(bucket, 10.5)];
    for result in [rl.charge(&too_big).await, rl.available_in(&too_big).await] {
        assert!(matches!(
            result,
            Err(RateLimitError::CostExceedsCapacity { .. })
        ));
    }
    let fleet = fleet(&redis.url(), 0, 1_000, &unique("big"));
    let result = fleet.try_acquire(1_001, 0).await;
    assert!(
        matches!(result, Err(AcquireError::Invalid(_))),
        "{result:?}"
    );
}

/// Redis unreachable: `Open` allows everything, `LocalShare` enforces this process's share.
#[tokio::test]
async fn unreachable_redis_opens_or_falls_back_to_the_local_share() {
    let url = closed_url();
    let bucket = Bucket::new(&unique("down"), 40.0, 0.001).unwrap();
    let open = limiter(&url, FailMode::Open);
    for _ in 0..50 {
        let d = charge(&open, &bucket, 1.0).await;
        assert!(d.allowed);
        assert_eq!(d.source, Source::FailedOpen);
    }
    let local = limiter(&url, FailMode::LocalShare { processes: 4 });
    let mut granted = 0;
    for _ in 0..30 {
        let d = charge(&local, &bucket, 1.0).await;
        assert_eq!(d.source, Source::Local);
        granted += u32::from(d.allowed);
    }
    assert_eq!(granted, 10, "a quarter of 40");
}

/// A Redis that accepts but does not answer counts as unreachable after the timeout.
#[tokio::test]
async fn a_hung_redis_counts_as_unreachable() {
    let redis = TestRedis::start().await;
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", redis.port)).await;
    let url = format!("redis://127.0.0.1:{}/0", proxy.port);
    let rl = RateLimiter::new(
        conn(&url),
        LimiterOptions {
            timeout: Duration::from_millis(100),
            fail_mode: FailMode::LocalShare { processes: 2 },
        },
    );
    let bucket = Bucket::new(&unique("hung"), 4.0, 0.001).unwrap();
    assert_eq!(charge(&rl, &bucket, 1.0).await.source, Source::Redis);
    proxy.set_latency(Duration::from_secs(5));
    let started = Instant::now();
    let d = charge(&rl, &bucket, 2.0).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(d.source, Source::Local);
    assert_levels(&d.levels, &[0.0]);
    assert!(!charge(&rl, &bucket, 1.0).await.allowed, "the share is 2");
}

/// The LLM limits fail closed too: ten processes' worth of shares, one process's allowance.
#[tokio::test]
async fn the_fleet_limiter_fails_closed_to_its_share() {
    let limits = FleetLimits {
        requests_per_min: 100,
        ..Default::default()
    };
    let options = FleetOptions {
        processes: 10,
        ..Default::default()
    };
    let fleet = FleetLimiter::new(conn(&closed_url()), limits, &options).unwrap();
    let mut granted = 0;
    for _ in 0..15 {
        if let Ok(r) = fleet.try_acquire(10, 10).await {
            granted += 1;
            fleet.settle(r, 10, 10).await;
        }
    }
    assert_eq!(granted, 10);
}

fn fleet(url: &str, requests_per_min: u64, input_tokens_per_min: u64, name: &str) -> FleetLimiter {
    let limits = FleetLimits {
        requests_per_min,
        input_tokens_per_min,
        output_tokens_per_min: 0,
    };
    let options = FleetOptions {
        max_wait: Duration::from_millis(200),
        name: name.to_string(),
        ..Default::default()
    };
    FleetLimiter::new(conn(url), limits, &options).unwrap()
}

/// Settling charges the real usage: more than estimated takes from later callers, less is
/// refunded.
#[tokio::test]
async fn settle_corrects_the_estimate_from_usage() {
    let redis = TestRedis::start().await;
    let fleet = fleet(&redis.url(), 0, 1_000, &unique("settle"));
    let r = fleet.try_acquire(100, 0).await.unwrap();
    fleet.settle(r, 900, 0).await;
    let refused = fleet.try_acquire(200, 0).await;
    assert!(
        matches!(
            refused,
            Err(AcquireError::Throttled {
                limit: Limit::InputTokens,
                ..
            })
        ),
        "{refused:?}"
    );
    let r = fleet.try_acquire(100, 0).await.unwrap();
    fleet.settle(r, 0, 0).await;
    let r = fleet.try_acquire(100, 0).await.expect("the refund is back");
    fleet.settle(r, 100, 0).await;
}

/// `acquire` sleeps for a short wait, and gives up with the wait when it exceeds the maximum.
#[tokio::test]
async fn acquire_waits_up_to_the_maximum_then_throttles() {
    let redis = TestRedis::start().await;
    // 6000 input tokens a minute: 100 a second.
    let fleet = fleet(&redis.url(), 0, 6_000, &unique("wait"));
    let _ = fleet.try_acquire(6_000, 0).await.unwrap();
    let started = Instant::now();
    let _ = fleet
        .acquire(10, 0)
        .await
        .expect("100 ms < the 200 ms maximum");
    assert!(started.elapsed() >= Duration::from_millis(90));
    match fleet.acquire(6_000, 0).await {
        Err(AcquireError::Throttled { limit, retry_after }) => {
            assert_eq!(limit, Limit::InputTokens);
            assert_near(retry_after, Duration::from_secs(60), 500);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "gave up at once"
    );
}

/// `anthropic-ratelimit-*-remaining` near zero lowers the fleet's allowance to it.
#[tokio::test]
async fn low_remaining_headers_clamp_the_allowance() {
    let redis = TestRedis::start().await;
    let fleet = fleet(&redis.url(), 100, 10_000, &unique("clamp"));
    let plenty = RateLimitHeaders::default().with(
        Limit::Requests,
        Quota {
            limit: 1_000,
            remaining: 900,
        },
    );
    assert!(fleet.observe_headers(&plenty).await.is_empty());
    let low = plenty
        .with(
            Limit::Requests,
            Quota {
                limit: 1_000,
                remaining: 3,
            },
        )
        .with(
            Limit::OutputTokens,
            Quota {
                limit: 1_000,
                remaining: 0,
            },
        );
    assert_eq!(
        fleet.observe_headers(&low).await,
        vec![Limit::Requests],
        "output tokens are unlimited here"
    );
    for _ in 0..3 {
        let _ = fleet.try_acquire(1, 0).await.unwrap();
    }
    let refused = fleet.try_acquire(1, 0).await;
    assert!(
        matches!(
            refused,
            Err(AcquireError::Throttled {
                limit: Limit::Requests,
                ..
            })
        ),
        "{refused:?}"
    );
}

fn spend_guard(url: &str, budgets: SpendBudgets, prefix: &str) -> SpendGuard {
    let options = SpendOptions {
        key_prefix: prefix.to_string(),
        ..Default::default()
    };
    SpendGuard::new(conn(url), budgets, &options)
}

/// Over a budget, `check` names the window, the spend and when it resets; the counters are
/// integer micro-dollars with an expiry.
#[tokio::test]
async fn over_budget_names_the_window_and_its_reset() {
    let redis = TestRedis::start().await;
    let prefix = unique("spend");
    let budgets = SpendBudgets {
        daily_usd: 1.0,
        monthly_usd: 50.0,
    };
    let guard = spend_guard(&redis.url(), budgets, &prefix);
    let now = Utc::now();
    guard.charge_at(0.6, now).await;
    guard.check_at(now).await.expect("0.60 of 1.00");
    let totals = guard.charge_at(0.5, now).await;
    assert_eq!((totals.day_usd, totals.month_usd), (1.1, 1.1));
    let over = guard.check_at(now).await.unwrap_err();
    assert_eq!(over.window, SpendWindow::Day);
    assert_eq!((over.spent_usd, over.budget_usd), (1.1, 1.0));
    assert_eq!(over.resets_at, SpendWindow::Day.resets_at(now));
    let day_key = format!("{prefix}:day:{}", now.format("%Y-%m-%d"));
    let micros: i64 = redis.conn().await.get(&day_key).await.unwrap();
    assert_eq!(micros, 1_100_000);
    let ttl = pttl(&redis, &day_key).await;
    assert!(ttl > 86_400_000, "past the window's end plus a day: {ttl}");
    assert!(pttl(&redis, &format!("{prefix}:month:{}", now.format("%Y-%m"))).await > 0);

    let month_only = SpendBudgets {
        daily_usd: 0.0,
        monthly_usd: 1.0,
    };
    let other_process = spend_guard(&redis.url(), month_only, &prefix);
    let over = other_process.check_at(now).await.unwrap_err();
    assert_eq!(
        over.window,
        SpendWindow::Month,
        "the fleet's spend is shared"
    );
    assert_eq!(over.resets_at, SpendWindow::Month.resets_at(now));
}

/// Redis unreachable: spend is counted in the process (and still stops work over budget),
/// then added to Redis once it is back.
#[tokio::test]
async fn spend_is_counted_locally_while_redis_is_down_and_sent_later() {
    let redis = TestRedis::start().await;
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", redis.port)).await;
    let url = format!("redis://127.0.0.1:{}/0", proxy.port);
    let prefix = unique("outage");
    let budgets = SpendBudgets {
        daily_usd: 1.0,
        monthly_usd: 0.0,
    };
    let guard = spend_guard(&url, budgets, &prefix);
    let now = Utc::now();
    guard.charge_at(0.2, now).await;
    proxy.set_down(true);
    guard.charge_at(0.5, now).await;
    guard.check_at(now).await.expect("0.70 of 1.00");
    let totals = guard.charge_at(0.4, now).await;
    assert!((totals.day_usd - 1.1).abs() < 1e-9, "{totals:?}");
    let over = guard.check_at(now).await.unwrap_err();
    assert_eq!(over.window, SpendWindow::Day);
    proxy.set_down(false);
    guard.charge_at(0.1, now).await;
    let day_key = format!("{prefix}:day:{}", now.format("%Y-%m-%d"));
    // The connection may take a moment to come back; a zero charge sends what is unsent.
    for _ in 0..100 {
        let micros: Option<i64> = redis.conn().await.get(&day_key).await.unwrap();
        if micros == Some(1_200_000) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        guard.charge_at(0.0, now).await;
    }
    panic!("the spend charged during the outage never reached Redis");
}

fn assert_levels(levels: &[f64], expected: &[f64]) {
    assert_eq!(levels.len(), expected.len(), "{levels:?}");
    for (level, want) in levels.iter().zip(expected) {
        assert!((level - want).abs() < 0.05, "{levels:?} vs {expected:?}");
    }
}

fn assert_near(got: Duration, want: Duration, tolerance_ms: u64) {
    let diff = got.abs_diff(want);
    assert!(
        diff <= Duration::from_millis(tolerance_ms),
        "{got:?} is not {want:?} ± {tolerance_ms} ms"
    );
}

/// A lease takes what the bucket holds, up to what it asks for, after the tokens it gives
/// back; an empty bucket grants nothing and says when the next token exists.
#[tokio::test]
async fn a_lease_takes_up_to_what_the_bucket_holds() {
    let redis = TestRedis::start().await;
    let limiter = limiter(&redis.url(), FailMode::Open);
    let bucket = Bucket::per_minute(&unique("lease"), 10.0).unwrap();
    let first = limiter.lease(&bucket, 4, 0).await;
    assert_eq!((first.granted, first.source), (4, Source::Redis));
    assert!((first.level.unwrap() - 6.0).abs() < 0.01, "{first:?}");
    let all = limiter.lease(&bucket, 100, 2).await;
    assert_eq!(all.granted, 8, "6 left and 2 given back: {all:?}");
    let none = limiter.lease(&bucket, 1, 0).await;
    assert_eq!(none.granted, 0);
    let wait = none.wait.as_secs_f64();
    assert!((5.9..=6.0).contains(&wait), "one token at 10/min: {wait}");
    assert!(
        pttl(&redis, bucket.key()).await > 0,
        "the key keeps an expiry"
    );
}

/// Two processes leasing from one bucket of 100 admit exactly 100 of 300 concurrent
/// requests (plus what refills meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_leasing_one_bucket_admit_exactly_its_capacity() {
    let redis = TestRedis::start().await;
    let processes = [0, 1].map(|_| Leases::new(limiter(&redis.url(), FailMode::Open)));
    let bucket = Bucket::per_minute(&unique("shared"), 100.0).unwrap();
    let started = Instant::now();
    let answers = join_all((0..300).map(|i| {
        let (leases, bucket) = (processes[i % 2].clone(), bucket.clone());
        tokio::spawn(async move { leases.acquire(&bucket).await })
    }))
    .await;
    let refilled = (started.elapsed().as_secs_f64() * 100.0 / 60.0).floor() as usize;
    let admitted = answers
        .iter()
        .filter(|a| a.as_ref().unwrap().allowed)
        .count();
    assert!(
        (100..=100 + refilled).contains(&admitted),
        "{admitted} admitted, {refilled} refilled"
    );
    for answer in answers {
        let answer = answer.unwrap();
        let state = answer.state.expect("Redis answered every request");
        if !answer.allowed {
            assert!(state.retry_in > Duration::ZERO && state.remaining == 0);
        }
    }
}

/// A busy key costs Redis one call per lease, not one per request: 2,000 requests from 20
/// clients, all admitted, in far fewer `EVALSHA`s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_key_costs_one_redis_call_per_lease() {
    let redis = TestRedis::start().await;
    let leases = Leases::new(limiter(&redis.url(), FailMode::Open));
    let bucket = Bucket::per_minute(&unique("busy"), 1_000_000.0).unwrap();
    let before = evalsha_calls(&redis).await;
    let admitted = join_all((0..20).map(|_| {
        let (leases, bucket) = (leases.clone(), bucket.clone());
        tokio::spawn(async move {
            let mut admitted = 0;
            for _ in 0..100 {
                admitted += usize::from(leases.acquire(&bucket).await.allowed);
            }
            admitted
        })
    }))
    .await;
    let admitted: usize = admitted.into_iter().map(Result::unwrap).sum();
    assert_eq!(admitted, 2_000);
    let calls = evalsha_calls(&redis).await - before;
    assert!(
        (1..=200).contains(&calls),
        "{calls} EVALSHA for 2,000 requests"
    );
}

/// Tokens a process leased ahead and did not use within the lease go back to the bucket:
/// after ten quick requests and a pause, the key can still send exactly the other 50 of 60.
#[tokio::test]
async fn tokens_left_in_an_ended_lease_go_back_to_the_bucket() {
    let redis = TestRedis::start().await;
    let leases = Leases::new(limiter(&redis.url(), FailMode::Open));
    let bucket = Bucket::per_minute(&unique("give-back"), 60.0).unwrap();
    for _ in 0..10 {
        assert!(leases.acquire(&bucket).await.allowed);
    }
    let tokens: f64 = redis
        .conn()
        .await
        .hget(bucket.key(), "tokens")
        .await
        .unwrap();
    assert!(tokens < 50.0, "tokens leased ahead: {tokens} left in Redis");
    tokio::time::sleep(LEASE_LIFETIME + Duration::from_millis(20)).await;
    let started = Instant::now();
    let first = leases.acquire(&bucket).await;
    assert_eq!(
        first.state.unwrap().remaining,
        49,
        "50 left, this one taken"
    );
    let mut admitted = 1;
    while leases.acquire(&bucket).await.allowed {
        admitted += 1;
    }
    let refilled = (started.elapsed().as_secs_f64() + 0.2).floor() as usize;
    assert!(
        (50..=50 + refilled).contains(&admitted),
        "{admitted} admitted after the pause"
    );
}

/// `EVALSHA` calls Redis has served so far.
async fn evalsha_calls(redis: &TestRedis) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}
