//! The task face's words, shared by the server that answers it and the
//! clients that call it: the entity type a task is, its methods, and the
//! kinds of task attachment (one list; everything else derives from it).

use crate::stream::ContentType;

/// Tasks are entities `/task/{taskId}`.
pub const TASK_TYPE: &str = "task";

/// Every method of the face, in the order metrics and MCP list them.
pub const METHODS: &[&str] = &[
    "task.create",
    "task.get",
    "task.update",
    "task.list",
    "task.assign",
    "task.unassign",
    "task.claim",
    "task.complete",
    "task.delete",
    "task.create_attachment",
    "task.get_attachment",
    "task.list_attachments",
    "task.get_attachments_batch",
    "task.delete_attachment",
];

/// The kinds of task attachment by name, in [`AttachmentKind`] order.
pub const ATTACHMENT_KINDS: &[&str] = &["json", "markdown", "text", "url", "binary"];

/// A task attachment's kind (its `type` in the task API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachmentKind {
    Json,
    Markdown,
    Text,
    Url,
    Binary,
}

impl AttachmentKind {
    /// Every kind, in [`ATTACHMENT_KINDS`] order.
    pub const ALL: [AttachmentKind; 5] = [
        AttachmentKind::Json,
        AttachmentKind::Markdown,
        AttachmentKind::Text,
        AttachmentKind::Url,
        AttachmentKind::Binary,
    ];

    pub fn parse(s: &str) -> Option<AttachmentKind> {
        ATTACHMENT_KINDS.iter().position(|k| *k == s).map(|i| AttachmentKind::ALL[i])
    }

    pub fn as_str(self) -> &'static str {
        ATTACHMENT_KINDS[self as usize]
    }

    /// The media type an attachment of this kind has unless it names another.
    pub fn default_mime(self) -> &'static str {
        match self {
            AttachmentKind::Json => "application/json",
            AttachmentKind::Markdown => "text/markdown",
            AttachmentKind::Text => "text/plain",
            AttachmentKind::Url => "text/uri-list",
            AttachmentKind::Binary => ContentType::OCTET_STREAM,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_round_trips_through_its_name_and_the_list_names_every_kind() {
        assert_eq!(ATTACHMENT_KINDS.len(), AttachmentKind::ALL.len());
        for kind in AttachmentKind::ALL {
            assert_eq!(AttachmentKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(AttachmentKind::parse("image"), None);
    }
}
