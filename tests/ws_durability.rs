//! WebSocket acks mean durable: every task acked OK is in the store when the ack leaves, so a
//! `kill -9` right after the last ack loses none of them; a duplicate id gets a Fail ack naming
//! it.

mod common;
use common::ws::{connect, next, send};
use common::Server;
use serde_json::{json, Value};

fn delayed(id: &str) -> Value {
    json!({"id": id, "method": "GET", "name": "http://127.0.0.1:9/never", "delay": 60})
}

#[test]
fn every_acked_task_survives_a_kill_9_right_after_its_ack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = Server::builder(&dir).start();
    let mut ws = connect(&s, "", &[]).expect("WebSocket handshake");
    // 300 tasks: single-task frames and arrays, all sent before any ack is read.
    let mut sent = Vec::new();
    for f in 0..100 {
        let id = format!("ws-d{f}");
        send(&mut ws, &delayed(&id));
        sent.push(id);
        let ids: Vec<String> = (0..2).map(|k| format!("ws-d{f}-{k}")).collect();
        send(
            &mut ws,
            &json!(ids.iter().map(|i| delayed(i)).collect::<Vec<_>>()),
        );
        sent.extend(ids);
    }
    let mut acked = Vec::new();
    while acked.len() < sent.len() {
        let ack = next(&mut ws);
        assert_eq!(ack["result"], "OK", "every task is acked OK: {ack}");
        acked.push(ack["id"].as_str().expect("ack id").to_string());
    }
    s.kill9();
    assert_eq!(acked, sent, "one ack per task, in order");

    let s2 = Server::builder(&dir).start();
    let mut lost = Vec::new();
    for id in &acked {
        let (code, r) = s2.get(&format!("/task_resp/{id}?timeout=0"));
        if (code, &r["status"]) != (202, &json!("delayed")) {
            lost.push(format!("{id}: {code} {r}"));
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acked tasks are not in the store after kill -9, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    let (_, info) = s2.get("/sys_info");
    assert_eq!(info["delaying_total"], acked.len(), "{info}");
}

#[test]
fn a_duplicate_id_gets_a_fail_ack_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).start();
    let mut ws = connect(&s, "", &[]).expect("WebSocket handshake");
    // Sent back to back, and twice in one array: the first is stored, every repeat refused.
    send(&mut ws, &delayed("ws-dup"));
    send(&mut ws, &delayed("ws-dup"));
    send(
        &mut ws,
        &json!([
            delayed("ws-dup-arr"),
            delayed("ws-dup-arr"),
            delayed("ws-other")
        ]),
    );
    let acks: Vec<Value> = (0..5).map(|_| next(&mut ws)).collect();
    let summary: Vec<(&str, &str)> = acks
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap_or("?"),
                a["result"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("ws-dup", "OK"),
            ("ws-dup", "Fail"),
            ("ws-dup-arr", "OK"),
            ("ws-dup-arr", "Fail"),
            ("ws-other", "OK"),
        ],
        "{acks:?}"
    );
    for (i, id) in [(1, "ws-dup"), (3, "ws-dup-arr")] {
        let reason = acks[i]["reason"].as_str().unwrap_or("");
        assert!(
            reason.contains(&format!("{id:?}")) && reason.contains("already"),
            "the Fail ack names the duplicate id: {}",
            acks[i]
        );
    }
    // The first of each is stored once.
    let (_, info) = s.get("/sys_info");
    assert_eq!(info["counts"]["accepted"], 3, "{info}");
}
