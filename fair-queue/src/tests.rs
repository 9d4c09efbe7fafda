use super::*;

fn ticket(class: Class, tenant: &str, weight: u32, cost: u32) -> Ticket {
    Ticket {
        class,
        tenant: tenant.into(),
        weight,
        cost,
    }
}

fn std(tenant: &str) -> Ticket {
    ticket(Class::Standard, tenant, 1, 1)
}

fn drain_all(q: &mut FairQueue<String>, now: Instant) -> Vec<String> {
    std::iter::from_fn(|| q.pop(now).map(|(s, _)| s)).collect()
}

#[test]
fn a_flooding_tenant_queues_behind_itself() {
    let t0 = Instant::now();
    let mut q = FairQueue::new(None, Duration::ZERO);
    for i in 0..100 {
        q.push(format!("a{i}"), &std("a"), t0).unwrap();
    }
    q.push("b0".into(), &std("b"), t0).unwrap();
    // b's job is tagged from the virtual clock, not behind a's flood.
    let order = drain_all(&mut q, t0);
    let b = order.iter().position(|s| s == "b0").unwrap();
    assert!(b <= 1, "b served at position {b}: {order:?}");
}

#[test]
fn backlogged_tenants_share_by_weight_and_cost() {
    let t0 = Instant::now();
    let mut q = FairQueue::new(None, Duration::ZERO);
    // a: weight 3, images (cost 1); b: weight 1, images; c: weight 1,
    // videos of 4 frames.
    for i in 0..300 {
        q.push(format!("a{i}"), &ticket(Class::Standard, "a", 3, 1), t0)
            .unwrap();
        q.push(format!("b{i}"), &ticket(Class::Standard, "b", 1, 1), t0)
            .unwrap();
        q.push(format!("c{i}"), &ticket(Class::Standard, "c", 1, 4), t0)
            .unwrap();
    }
    // Served cost over the first 200 jobs: a gets 3 shares, b and c one each.
    let first: Vec<String> = (0..200).map(|_| q.pop(t0).unwrap().0).collect();
    let cost = |p: char, c: u32| first.iter().filter(|s| s.starts_with(p)).count() as u32 * c;
    let (a, b, c) = (cost('a', 1), cost('b', 1), cost('c', 4));
    let total = f64::from(a + b + c);
    for (got, want) in [(a, 0.6), (b, 0.2), (c, 0.2)] {
        let share = f64::from(got) / total;
        assert!((share - want).abs() < 0.03, "shares {a} {b} {c}");
    }
}

#[test]
fn classes_are_served_in_strict_order() {
    let t0 = Instant::now();
    let mut q = FairQueue::new(None, Duration::from_secs(10));
    q.push("batch".into(), &ticket(Class::Batch, "x", 1, 1), t0)
        .unwrap();
    q.push("standard".into(), &std("y"), t0).unwrap();
    q.push("critical".into(), &ticket(Class::Critical, "z", 1, 1), t0)
        .unwrap();
    assert_eq!(
        q.peek_class(t0),
        Some(((Class::Critical, t0), Class::Critical))
    );
    assert_eq!(drain_all(&mut q, t0), ["critical", "standard", "batch"]);
}

#[test]
fn an_aged_batch_lane_competes_as_standard_by_age_never_as_critical() {
    let t0 = Instant::now();
    let aging = Duration::from_millis(100);
    let mut q: FairQueue<String> = FairQueue::new(None, aging);
    q.push("old batch".into(), &ticket(Class::Batch, "x", 1, 1), t0)
        .unwrap();
    let t1 = t0 + Duration::from_millis(150);
    q.push("standard".into(), &std("y"), t1).unwrap();
    q.push("critical".into(), &ticket(Class::Critical, "z", 1, 1), t1)
        .unwrap();
    // At 150 ms the batch lane competes as standard: after critical,
    // before the younger standard job.
    assert_eq!(q.pop(t1).unwrap().0, "critical");
    assert_eq!(
        q.peek_class(t1),
        Some(((Class::Standard, t0), Class::Batch))
    );
    assert_eq!(q.pop(t1).unwrap().0, "old batch");

    // However long it waited, it never goes before critical work, and
    // the standard lane goes first while its oldest job is older.
    let mut q: FairQueue<String> = FairQueue::new(None, aging);
    q.push("older standard".into(), &std("w"), t0).unwrap();
    let t_batch = t0 + Duration::from_millis(100);
    q.push(
        "old batch".into(),
        &ticket(Class::Batch, "x", 1, 1),
        t_batch,
    )
    .unwrap();
    q.push("standard".into(), &std("y"), t1).unwrap();
    let t2 = t0 + Duration::from_secs(60);
    q.push("critical".into(), &ticket(Class::Critical, "z", 1, 1), t2)
        .unwrap();
    assert_eq!(
        drain_all(&mut q, t2),
        ["critical", "older standard", "old batch", "standard"]
    );
}

#[test]
fn an_aged_lane_still_serves_its_tenants_by_fair_share() {
    let t0 = Instant::now();
    let mut q = FairQueue::new(None, Duration::from_millis(100));
    for i in 0..20 {
        q.push(format!("a{i}"), &ticket(Class::Batch, "a", 1, 1), t0)
            .unwrap();
    }
    let t1 = t0 + Duration::from_millis(500);
    q.push("b0".into(), &ticket(Class::Batch, "b", 1, 1), t1)
        .unwrap();
    q.pop(t1).unwrap();
    // b's job is younger than all of a's, yet goes next by finish tag.
    let next: Vec<String> = (0..2).map(|_| q.pop(t1).unwrap().0).collect();
    assert!(next.contains(&"b0".to_string()), "{next:?}");
}

#[test]
fn peek_owner_names_the_job_pop_takes() {
    let t0 = Instant::now();
    let mut q = FairQueue::new(None, Duration::from_millis(100));
    q.push("b", &ticket(Class::Batch, "x", 1, 1), t0).unwrap();
    q.push("s", &std("y"), t0).unwrap();
    assert_eq!(q.peek_owner(t0), Some((Class::Standard, "y")));
    assert_eq!(q.peek(t0), Some(&"s"));
    assert_eq!(q.pop(t0).map(|(j, _)| j), Some("s"));
    // Aged one period, the batch job goes before a fresh standard one,
    // and is still named as class batch.
    let late = t0 + Duration::from_millis(150);
    q.push("s2", &std("y"), late).unwrap();
    assert_eq!(q.peek_owner(late), Some((Class::Batch, "x")));
    assert_eq!(q.pop(late).map(|(j, _)| j), Some("b"));
}

#[test]
fn a_full_queue_gives_the_job_back() {
    let t0 = Instant::now();
    let mut q = FairQueue::new(Some(2), Duration::ZERO);
    q.push(1, &std("a"), t0).unwrap();
    q.push(2, &std("b"), t0).unwrap();
    assert_eq!(q.push(3, &std("c"), t0), Err(3));
    assert_eq!(q.len(), 2);
    assert_eq!(q.oldest(), Some(t0));
    let mut all = q.drain();
    all.sort_unstable();
    assert_eq!(all, [1, 2]);
    assert!(q.is_empty() && q.pop(t0).is_none());
}

#[test]
fn oldest_of_looks_only_at_the_given_classes() {
    let t0 = Instant::now();
    let t1 = t0 + Duration::from_millis(5);
    let mut q = FairQueue::new(None, Duration::ZERO);
    q.push(1, &ticket(Class::Batch, "a", 1, 1), t0).unwrap();
    q.push(2, &std("b"), t1).unwrap();
    assert_eq!(q.oldest_of(&[Class::Critical, Class::Standard]), Some(t1));
    assert_eq!(q.oldest(), Some(t0));
}

#[test]
fn an_idle_tenant_gets_no_credit_for_its_idle_time() {
    let t0 = Instant::now();
    let mut q = FairQueue::new(None, Duration::ZERO);
    // b is served alone for a while, then a arrives with a backlog: b
    // must not have to wait for a to "catch up" on the time it was idle.
    for i in 0..50 {
        q.push(format!("b{i}"), &std("b"), t0).unwrap();
    }
    for _ in 0..40 {
        q.pop(t0).unwrap();
    }
    for i in 0..50 {
        q.push(format!("a{i}"), &std("a"), t0).unwrap();
    }
    let next: Vec<String> = (0..10).map(|_| q.pop(t0).unwrap().0).collect();
    let b = next.iter().filter(|s| s.starts_with('b')).count();
    assert!((4..=6).contains(&b), "{next:?}");
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever is pushed comes out exactly once, and the length and
        /// capacity are kept.
        #[test]
        fn every_job_comes_out_once(
            jobs in proptest::collection::vec((0usize..3, 0u8..4, 1u32..5, 1u32..9, 0u64..500), 0..200),
            cap in 1usize..300,
            aging_ms in 0u64..100,
        ) {
            let t0 = Instant::now();
            let mut q = FairQueue::new(Some(cap), Duration::from_millis(aging_ms));
            let mut accepted = Vec::new();
            for (i, &(class, tenant, weight, cost, at)) in jobs.iter().enumerate() {
                let t = ticket(Class::ALL[class], &format!("t{tenant}"), weight, cost);
                if q.push(i, &t, t0 + Duration::from_millis(at)).is_ok() {
                    accepted.push(i);
                }
                prop_assert!(q.len() <= cap);
            }
            prop_assert_eq!(accepted.len(), jobs.len().min(cap));
            let now = t0 + Duration::from_millis(600);
            let mut out = Vec::new();
            while let Some((i, _)) = q.pop(now) {
                out.push(i);
            }
            out.sort_unstable();
            prop_assert_eq!(out, accepted);
            prop_assert!(q.is_empty());
        }
    }
}

#[test]
fn pop_where_takes_the_best_job_of_a_wanted_tenant_within_the_class_order() {
    let t0 = Instant::now();
    let mut q = FairQueue::new(None, Duration::ZERO);
    let t = |tenant: &str, class| Ticket {
        class,
        tenant: tenant.into(),
        weight: 1,
        cost: 1,
    };
    q.push("a1", &t("a", Class::Standard), t0).unwrap();
    q.push("a2", &t("a", Class::Standard), t0).unwrap();
    q.push("b1", &t("b", Class::Standard), t0).unwrap();
    q.push("c1", &t("c", Class::Batch), t0).unwrap();
    let not_a = |x: &str| x != "a";
    assert_eq!(q.peek_owner_where(t0, &not_a), Some((Class::Standard, "b")));
    assert_eq!(q.pop_where(t0, &not_a).map(|(j, _)| j), Some("b1"));
    // Only a is left in the class served next: nothing wanted there, even
    // though a batch job of c is queued (classes keep their order).
    assert_eq!(q.pop_where(t0, &not_a), None);
    assert_eq!(q.pop(t0).map(|(j, _)| j), Some("a1"));
    assert_eq!(q.len(), 2);
}
