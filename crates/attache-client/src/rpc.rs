//! The task face: JSON-RPC 2.0 at `POST /rpc`, one typed method per `task.*`
//! call (ClaudeBench's parameters and results), plus [`RuntimeServerClient::rpc`]
//! for any method by name.

use std::sync::atomic::{AtomicU64, Ordering};

use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::client::RuntimeServerClient;
use crate::error::{Error, Result, RpcError};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The task-attachment kinds.
pub const TASK_ATTACHMENT_TYPES: &[&str] = attache_core::task::ATTACHMENT_KINDS;

impl RuntimeServerClient {
    /// Calls any JSON-RPC method and returns its `result`.
    pub async fn rpc(&self, method: &str, params: Value) -> Result<Value> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let body = json!({ "jsonrpc": "2.0", "method": method, "params": params, "id": id });
        let res = self.send(self.request(Method::POST, "/rpc").json(&body), &Method::POST, "/rpc").await?;
        let answer: Value = self.json(res, "JSON-RPC answer").await?;
        if let Some(err) = answer.get("error") {
            return Err(Error::Rpc {
                method: method.to_owned(),
                error: RpcError {
                    code: err.get("code").and_then(Value::as_i64).unwrap_or(-32603),
                    message: err.get("message").and_then(Value::as_str).unwrap_or("unknown error").to_owned(),
                    data: err.get("data").cloned(),
                },
            });
        }
        answer
            .get("result")
            .cloned()
            .ok_or_else(|| Error::Protocol(format!("the answer to {method} has neither result nor error")))
    }

    async fn call<P: Serialize, R: DeserializeOwned>(&self, method: &str, params: &P) -> Result<R> {
        let params = serde_json::to_value(params).map_err(|e| Error::Invalid(e.to_string()))?;
        let result = self.rpc(method, params).await?;
        serde_json::from_value(result).map_err(|e| Error::Protocol(format!("the result of {method}: {e}")))
    }

    pub fn tasks(&self) -> TaskClient<'_> {
        TaskClient { client: self }
    }
}

/// The `task.*` methods.
pub struct TaskClient<'a> {
    client: &'a RuntimeServerClient,
}

/// A task as the task methods return it; fields a method does not return are `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment_count: Option<u64>,
    /// Whatever else the server returns (`attachments`, `attachmentKeys`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CreateTask {
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TaskUpdates {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListTasks {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assigned_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskPage {
    pub tasks: Vec<Task>,
    #[serde(default)]
    pub total_count: u64,
    #[serde(default)]
    pub has_more: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    pub task_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_assignment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unassigned_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claim {
    pub claimed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Completion {
    pub id: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deletion {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub deleted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<String>,
}

/// A key-value attachment of a task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskAttachment {
    #[serde(default)]
    pub id: String,
    pub task_id: String,
    pub key: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

/// The parameters of `task.create_attachment`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewTaskAttachment {
    pub task_id: String,
    pub key: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

impl NewTaskAttachment {
    pub fn json(task_id: &str, key: &str, value: Value) -> NewTaskAttachment {
        NewTaskAttachment {
            task_id: task_id.into(),
            key: key.into(),
            kind: "json".into(),
            value: Some(value),
            ..Default::default()
        }
    }
    pub fn markdown(task_id: &str, key: &str, content: &str) -> NewTaskAttachment {
        NewTaskAttachment {
            task_id: task_id.into(),
            key: key.into(),
            kind: "markdown".into(),
            content: Some(content.into()),
            ..Default::default()
        }
    }
    pub fn url(task_id: &str, key: &str, url: &str) -> NewTaskAttachment {
        NewTaskAttachment {
            task_id: task_id.into(),
            key: key.into(),
            kind: "url".into(),
            url: Some(url.into()),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskAttachmentPage {
    pub attachments: Vec<TaskAttachment>,
    #[serde(default)]
    pub total_count: u64,
    #[serde(default)]
    pub has_more: bool,
}

#[derive(Deserialize)]
struct Batch {
    attachments: Vec<TaskAttachment>,
}

impl TaskClient<'_> {
    pub async fn create(&self, task: &CreateTask) -> Result<Task> {
        self.client.call("task.create", task).await
    }

    pub async fn get(&self, id: &str) -> Result<Task> {
        self.client.call("task.get", &json!({ "id": id })).await
    }

    pub async fn update(&self, id: &str, updates: &TaskUpdates) -> Result<Task> {
        self.client.call("task.update", &json!({ "id": id, "updates": updates })).await
    }

    pub async fn list(&self, filter: &ListTasks) -> Result<TaskPage> {
        self.client.call("task.list", filter).await
    }

    pub async fn assign(&self, task_id: &str, instance_id: &str) -> Result<Assignment> {
        self.client.call("task.assign", &json!({ "taskId": task_id, "instanceId": instance_id })).await
    }

    pub async fn unassign(&self, task_id: &str) -> Result<Assignment> {
        self.client.call("task.unassign", &json!({ "taskId": task_id })).await
    }

    pub async fn claim(&self, worker_id: &str) -> Result<Claim> {
        self.client.call("task.claim", &json!({ "workerId": worker_id })).await
    }

    /// Completes an assigned task; without a result ClaudeBench records it as failed.
    pub async fn complete(&self, id: &str, worker_id: Option<&str>, result: Option<Value>) -> Result<Completion> {
        let mut params = json!({ "id": id });
        if let Some(w) = worker_id {
            params["workerId"] = json!(w);
        }
        if let Some(r) = result {
            params["result"] = r;
        }
        self.client.call("task.complete", &params).await
    }

    pub async fn delete(&self, id: &str) -> Result<Deletion> {
        self.client.call("task.delete", &json!({ "id": id })).await
    }

    pub async fn create_attachment(&self, attachment: &NewTaskAttachment) -> Result<TaskAttachment> {
        self.client.call("task.create_attachment", attachment).await
    }

    pub async fn get_attachment(&self, task_id: &str, key: &str) -> Result<TaskAttachment> {
        self.client.call("task.get_attachment", &json!({ "taskId": task_id, "key": key })).await
    }

    pub async fn list_attachments(
        &self,
        task_id: &str,
        kind: Option<&str>,
        limit: Option<u64>,
        offset: Option<u64>,
    ) -> Result<TaskAttachmentPage> {
        let mut params = json!({ "taskId": task_id });
        if let Some(k) = kind {
            params["type"] = json!(k);
        }
        if let Some(l) = limit {
            params["limit"] = json!(l);
        }
        if let Some(o) = offset {
            params["offset"] = json!(o);
        }
        self.client.call("task.list_attachments", &params).await
    }

    /// Several attachments at once, in request order; `(task_id, key)` pairs.
    pub async fn get_attachments_batch(&self, requests: &[(&str, &str)]) -> Result<Vec<TaskAttachment>> {
        let requests: Vec<Value> = requests.iter().map(|(t, k)| json!({ "taskId": t, "key": k })).collect();
        let batch: Batch = self.client.call("task.get_attachments_batch", &json!({ "requests": requests })).await?;
        Ok(batch.attachments)
    }

    pub async fn delete_attachment(&self, task_id: &str, key: &str) -> Result<Deletion> {
        self.client.call("task.delete_attachment", &json!({ "taskId": task_id, "key": key })).await
    }
}
