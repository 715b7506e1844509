//! An example agent: for each message sent to an entity of its type, it reads
//! the message's input images, hydrates the conversation as a model would
//! receive it, and writes an output attachment (a JSON report) about the
//! message.
//!
//! ```sh
//! attache serve --data-dir /tmp/attache &
//! cargo run -p attache-client --example image_agent            # handles entities of type "vision"
//! attache entity spawn /vision/demo
//! attache send /vision/demo "what is in these?" --attach cat.png --attach dog.jpg
//! attache ls /vision/demo                                    # the report is an output attachment
//! ```
//!
//! Settings: `ATTACHE_URL` (default http://127.0.0.1:4437), `ATTACHE_PRINCIPAL`
//! or `ATTACHE_TOKEN`, and the entity type as the first argument.

use attache_client::hydrate::HydrationLimits;
use attache_client::{
    AttachmentInput, HandlerContext, HandlerResult, PrincipalKey, Role, Runtime, RuntimeServerClient, DEFAULT_URL,
};
use serde_json::json;

/// Width and height from a PNG, GIF or JPEG header, when the bytes say.
fn dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() >= 24 {
        let w = u32::from_be_bytes(bytes[16..20].try_into().ok()?);
        let h = u32::from_be_bytes(bytes[20..24].try_into().ok()?);
        return Some((w, h));
    }
    if bytes.starts_with(b"GIF8") && bytes.len() >= 10 {
        return Some((
            u16::from_le_bytes([bytes[6], bytes[7]]) as u32,
            u16::from_le_bytes([bytes[8], bytes[9]]) as u32,
        ));
    }
    if bytes.starts_with(&[0xFF, 0xD8]) {
        // Walk the JPEG segments to the first start-of-frame.
        let mut i = 2;
        while i + 9 < bytes.len() {
            if bytes[i] != 0xFF {
                return None;
            }
            let marker = bytes[i + 1];
            let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
            if (0xC0..=0xCF).contains(&marker) && ![0xC4, 0xC8, 0xCC].contains(&marker) {
                let h = u16::from_be_bytes([bytes[i + 5], bytes[i + 6]]) as u32;
                let w = u16::from_be_bytes([bytes[i + 7], bytes[i + 8]]) as u32;
                return Some((w, h));
            }
            i += 2 + len;
        }
    }
    None
}

async fn handle(ctx: HandlerContext) -> HandlerResult {
    let mut images = Vec::new();
    for entry in ctx.attachments.inputs() {
        if !entry.mime_type.starts_with("image/") {
            continue;
        }
        let bytes = ctx.attachments.read(&entry.id).await?;
        let (width, height) = dimensions(&bytes).unzip();
        images.push(json!({
            "id": entry.id,
            "filename": entry.filename,
            "mimeType": entry.mime_type,
            "bytes": bytes.len(),
            "width": width,
            "height": height,
        }));
    }
    // What a model call would carry: the conversation so far, images within the limits.
    let conversation = ctx.hydrate(&HydrationLimits::default()).await?;
    let blocks = conversation.to_anthropic();
    let block_count: usize =
        blocks.as_array().map(|m| m.iter().map(|m| m["content"].as_array().map_or(0, Vec::len)).sum()).unwrap_or(0);
    let report = json!({
        "message": ctx.message.key,
        "text": ctx.message.text(),
        "images": images,
        "model_input": {
            "messages": conversation.messages.len(),
            "content_blocks": block_count,
            "images_sent": conversation.image_ids(),
            "image_bytes": conversation.image_bytes(),
        },
    });
    let body = serde_json::to_vec_pretty(&report)?;
    let created = ctx
        .attachments
        .create(
            AttachmentInput::bytes(body)
                .mime_type("application/json")
                .filename(format!("report-{}.json", ctx.message.key))
                .role(Role::Output)
                .inbox(&ctx.message.key)?,
        )
        .await?;
    println!("{}: {} image(s) read; wrote {}", ctx.message.key, images.len(), created.id);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let entity_type = std::env::args().nth(1).unwrap_or_else(|| "vision".into());
    let url = std::env::var("ATTACHE_URL").unwrap_or_else(|_| DEFAULT_URL.into());
    let mut client = RuntimeServerClient::new(&url)?;
    if let Ok(p) = std::env::var("ATTACHE_PRINCIPAL") {
        client = client.with_principal(PrincipalKey::parse(&p)?);
    }
    if let Ok(t) = std::env::var("ATTACHE_TOKEN") {
        client = client.with_token(t);
    }
    client.health().await?;
    println!("handling messages to /{entity_type}/* on {url}; Ctrl-C stops");
    let runtime = Runtime::new(client, &entity_type, handle).start();
    tokio::signal::ctrl_c().await?;
    runtime.stop().await;
    Ok(())
}
