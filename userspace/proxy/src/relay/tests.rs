use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::*;

/// Two connected loopback sockets.
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (b, _) = listener.accept().await.expect("accept");
    (a, b)
}

/// app <-> [proxy_client | relay | proxy_upstream] <-> server
async fn topology() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
    let (app, proxy_client) = pair().await;
    let (proxy_upstream, server) = pair().await;
    (app, proxy_client, proxy_upstream, server)
}

fn settings(idle: Duration) -> Settings {
    Settings {
        idle_timeout: idle,
        buffer_size: 16 * 1024,
    }
}

fn byte(i: usize, seed: usize) -> u8 {
    ((i * 7 + seed) % 251) as u8
}

async fn send_pattern(mut w: impl AsyncWriteExt + Unpin, len: usize, seed: usize) {
    let data: Vec<u8> = (0..len).map(|i| byte(i, seed)).collect();
    w.write_all(&data).await.expect("write");
    w.shutdown().await.expect("shutdown");
}

async fn read_pattern(mut r: impl AsyncReadExt + Unpin, seed: usize) -> usize {
    let mut data = Vec::new();
    r.read_to_end(&mut data).await.expect("read");
    for (i, b) in data.iter().enumerate() {
        assert_eq!(*b, byte(i, seed), "byte {i} corrupted");
    }
    data.len()
}

#[tokio::test]
async fn relays_both_ways_and_propagates_half_close() {
    let (app, mut pc, mut pu, server) = topology().await;
    let (_pause_tx, pause) = watch::channel(false);
    let counters = Counters::default();
    const UP: usize = 3 << 20;
    const DOWN: usize = 5 << 20;

    let (app_r, app_w) = app.into_split();
    let (srv_r, srv_w) = server.into_split();
    let app_send = tokio::spawn(send_pattern(app_w, UP, 1));
    let srv_send = tokio::spawn(send_pattern(srv_w, DOWN, 2));
    let srv_recv = tokio::spawn(read_pattern(srv_r, 1));
    let app_recv = tokio::spawn(read_pattern(app_r, 2));

    let outcome = relay(
        &mut pc,
        &mut pu,
        Progress::default(),
        settings(Duration::from_secs(30)),
        &counters,
        &pause,
    )
    .await;
    assert!(matches!(outcome, Outcome::Done), "{outcome:?}");
    app_send.await.expect("app send");
    srv_send.await.expect("server send");
    assert_eq!(srv_recv.await.expect("server recv"), UP);
    assert_eq!(app_recv.await.expect("app recv"), DOWN);
    assert_eq!(counters.received.get(), UP as u64);
    assert_eq!(counters.sent.get(), DOWN as u64);
}

#[tokio::test]
async fn an_idle_connection_times_out() {
    let (_app, mut pc, mut pu, _server) = topology().await;
    let (_pause_tx, pause) = watch::channel(false);
    let started = std::time::Instant::now();
    let outcome = relay(
        &mut pc,
        &mut pu,
        Progress::default(),
        settings(Duration::from_millis(150)),
        &Counters::default(),
        &pause,
    )
    .await;
    assert!(matches!(outcome, Outcome::IdleTimeout), "{outcome:?}");
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn parking_loses_no_byte_and_the_relay_can_continue() {
    let (app, pc, pu, mut server) = topology().await;
    let (pause_tx, pause) = watch::channel(false);
    let (_app_r, mut app_w) = app.into_split();
    let first: Vec<u8> = (0..(1 << 20)).map(|i| byte(i, 3)).collect();
    let second: Vec<u8> = (1 << 20..3 << 20).map(|i| byte(i, 3)).collect();

    let first_relay = tokio::spawn(async move {
        let (mut pc, mut pu) = (pc, pu);
        let counters = Counters::default();
        let outcome = relay(
            &mut pc,
            &mut pu,
            Progress::default(),
            settings(Duration::from_secs(30)),
            &counters,
            &pause,
        )
        .await;
        (outcome, pc, pu)
    });
    app_w.write_all(&first).await.expect("first write");
    let mut received = vec![0; first.len()];
    server.read_exact(&mut received).await.expect("first read");
    assert_eq!(received, first);

    // Nothing is in flight: both directions park at their next read.
    pause_tx.send_replace(true);
    let (outcome, mut pc, mut pu) = tokio::time::timeout(Duration::from_secs(10), first_relay)
        .await
        .expect("parks promptly")
        .expect("relay");
    let Outcome::Parked(progress) = outcome else {
        panic!("expected a park, got {outcome:?}")
    };
    assert_eq!(progress, Progress::default(), "nothing had ended yet");

    // While parked, the app keeps sending; a second relay over the same sockets (as the
    // next agent runs it) delivers it, in order, after what came before.
    app_w.write_all(&second).await.expect("second write");
    app_w.shutdown().await.expect("half-close");
    pause_tx.send_replace(false);
    let pause = pause_tx.subscribe();
    let second_relay = tokio::spawn(async move {
        relay(
            &mut pc,
            &mut pu,
            progress,
            settings(Duration::from_secs(30)),
            &Counters::default(),
            &pause,
        )
        .await
    });
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).await.expect("second read");
    assert_eq!(
        rest, second,
        "bytes after the park arrive intact and in order"
    );
    drop(server);
    let outcome = second_relay.await.expect("relay");
    assert!(matches!(outcome, Outcome::Done), "{outcome:?}");
}

#[tokio::test]
async fn a_withdrawn_pause_lets_a_blocked_relay_carry_on() {
    let (app, mut pc, mut pu, mut server) = topology().await;
    // Small buffers so the upstream write blocks quickly and stays blocked.
    socket2::SockRef::from(&server)
        .set_recv_buffer_size(16 * 1024)
        .expect("rcvbuf");
    socket2::SockRef::from(&pu)
        .set_send_buffer_size(16 * 1024)
        .expect("sndbuf");
    let (pause_tx, pause) = watch::channel(false);
    const UP: usize = 1 << 20;
    let (_app_r, app_w) = app.into_split();
    let app_send = tokio::spawn(send_pattern(app_w, UP, 4));

    let relay_task = tokio::spawn(async move {
        let counters = Counters::default();
        let outcome = relay(
            &mut pc,
            &mut pu,
            Progress::default(),
            settings(Duration::from_secs(30)),
            &counters,
            &pause,
        )
        .await;
        (outcome, pc, pu)
    });
    // The server does not read: the upstream direction blocks in a write and cannot park.
    tokio::time::sleep(Duration::from_millis(100)).await;
    pause_tx.send_replace(true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !relay_task.is_finished(),
        "a direction blocked in a write must not count as parked"
    );
    pause_tx.send_replace(false);

    let mut received = Vec::new();
    let mut buf = vec![0; 1 << 16];
    while received.len() < UP {
        let n = server.read(&mut buf).await.expect("server read");
        assert_ne!(n, 0, "stream ended early");
        received.extend_from_slice(&buf[..n]);
    }
    assert!(received.iter().enumerate().all(|(i, b)| *b == byte(i, 4)));
    app_send.await.expect("app send");
    drop(server);
    let (outcome, _, _) = relay_task.await.expect("relay");
    assert!(!matches!(outcome, Outcome::Parked(_)), "{outcome:?}");
}

#[tokio::test]
async fn a_finished_direction_is_not_relayed_again() {
    let (app, mut pc, mut pu, server) = topology().await;
    let (_pause_tx, pause) = watch::channel(false);
    let (app_r, _app_w) = app.into_split();
    let (_srv_r, srv_w) = server.into_split();
    let srv_send = tokio::spawn(send_pattern(srv_w, 1 << 20, 5));
    let app_recv = tokio::spawn(read_pattern(app_r, 5));
    let progress = Progress {
        upstream_done: true,
        downstream_done: false,
    };
    let outcome = relay(
        &mut pc,
        &mut pu,
        progress,
        settings(Duration::from_secs(30)),
        &Counters::default(),
        &pause,
    )
    .await;
    assert!(matches!(outcome, Outcome::Done), "{outcome:?}");
    srv_send.await.expect("server send");
    assert_eq!(app_recv.await.expect("app recv"), 1 << 20);
}
