//! Every `task.*` method through the typed JSON-RPC client, against a real server.

mod common;

use attache_client::rpc::{CreateTask, ListTasks, NewTaskAttachment, TaskUpdates};
use attache_client::Error;
use common::TestServer;
use serde_json::json;

#[tokio::test]
async fn every_task_method_round_trips_through_the_typed_client() {
    let server = TestServer::start().await;
    let client = server.client_as("user:sam");
    let tasks = client.tasks();

    let created = tasks
        .create(&CreateTask {
            text: "review the diff".into(),
            priority: Some(70),
            metadata: Some(json!({"area": "sdk"})),
        })
        .await
        .unwrap();
    assert_eq!((created.status.as_deref(), created.priority), (Some("pending"), Some(70)));
    let id = created.id.clone();
    assert_eq!(tasks.get(&id).await.unwrap().text.as_deref(), Some("review the diff"));

    let updated = tasks.update(&id, &TaskUpdates { priority: Some(90), ..TaskUpdates::default() }).await.unwrap();
    assert_eq!(updated.priority, Some(90));
    let page = tasks.list(&ListTasks { status: Some("pending".into()), ..ListTasks::default() }).await.unwrap();
    assert_eq!(page.tasks.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), [id.as_str()]);
    assert_eq!(page.total_count, 1);

    let assigned = tasks.assign(&id, "worker-1").await.unwrap();
    assert_eq!(assigned.instance_id.as_deref(), Some("worker-1"));
    let unassigned = tasks.unassign(&id).await.unwrap();
    assert_eq!(unassigned.previous_assignment.as_deref(), Some("worker-1"));

    let made =
        tasks.create_attachment(&NewTaskAttachment::json(&id, "analysis", json!({"risk": "low"}))).await.unwrap();
    assert_eq!((made.key.as_str(), made.kind.as_str()), ("analysis", "json"));
    tasks.create_attachment(&NewTaskAttachment::markdown(&id, "notes", "# Notes")).await.unwrap();
    let got = tasks.get_attachment(&id, "analysis").await.unwrap();
    assert_eq!(got.value, Some(json!({"risk": "low"})));
    let listed = tasks.list_attachments(&id, None, None, None).await.unwrap();
    assert_eq!(listed.total_count, 2);
    let only_md = tasks.list_attachments(&id, Some("markdown"), Some(10), Some(0)).await.unwrap();
    assert_eq!(only_md.attachments.len(), 1);
    let batch = tasks.get_attachments_batch(&[(&id, "notes"), (&id, "analysis")]).await.unwrap();
    assert_eq!(batch.iter().map(|a| a.key.as_str()).collect::<Vec<_>>(), ["notes", "analysis"]);
    let removed = tasks.delete_attachment(&id, "notes").await.unwrap();
    assert!(removed.deleted);

    let claim = tasks.claim("worker-2").await.unwrap();
    assert!(claim.claimed);
    assert_eq!(claim.task_id.as_deref(), Some(id.as_str()));
    assert_eq!(claim.task.and_then(|t| t.assigned_to).as_deref(), Some("worker-2"));
    let done = tasks.complete(&id, Some("worker-2"), Some(json!({"ok": true}))).await.unwrap();
    assert_eq!(done.status, "completed");
    assert!(!tasks.claim("worker-2").await.unwrap().claimed, "nothing is left to claim");

    let deleted = tasks.delete(&id).await.unwrap();
    assert!(deleted.deleted);
    match tasks.get(&id).await.unwrap_err() {
        Error::Rpc { method, error } => {
            assert_eq!(method, "task.get");
            assert!(error.message.contains(&id), "{}", error.message);
        }
        other => panic!("expected a JSON-RPC error, got {other}"),
    }
}

#[tokio::test]
async fn rpc_errors_keep_their_code_and_unknown_methods_say_so() {
    let server = TestServer::start().await;
    let client = server.client();
    let err = client.rpc("task.nope", json!({})).await.unwrap_err();
    match err {
        Error::Rpc { error, .. } => assert_eq!(error.code, -32601),
        other => panic!("expected a JSON-RPC error, got {other}"),
    }
    let invalid = client.rpc("task.create", json!({"text": ""})).await.unwrap_err();
    assert!(matches!(invalid, Error::Rpc { ref error, .. } if error.code == -32602), "{invalid}");
}
