//! An incremental `text/event-stream` parser for [`super::Tail`]'s SSE mode.

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    pub name: String,
    pub data: String,
}

/// An incremental `text/event-stream` parser (the WHATWG rules for the fields attache uses).
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    buf: Vec<u8>,
    name: Option<String>,
    data: Vec<String>,
}

impl SseParser {
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub(crate) fn next_event(&mut self) -> Option<SseEvent> {
        while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=nl).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if line.is_empty() {
                if self.data.is_empty() && self.name.is_none() {
                    continue;
                }
                let event = SseEvent {
                    name: self.name.take().unwrap_or_else(|| "message".to_owned()),
                    data: std::mem::take(&mut self.data).join("\n"),
                };
                return Some(event);
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f.to_owned(), v.strip_prefix(' ').unwrap_or(v).to_owned()),
                None => (line.clone(), String::new()),
            };
            match field.as_str() {
                "event" => self.name = Some(value),
                "data" => self.data.push(value),
                _ => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_split_on_blank_lines_and_joined_by_newlines() {
        let mut p = SseParser::default();
        p.push(b"event: data\ndata:[1,\ndata:2]\n\nevent: control\r\ndata:{\"streamNextOffset\":\"x\"}\r\n");
        assert_eq!(p.next_event(), Some(SseEvent { name: "data".into(), data: "[1,\n2]".into() }));
        assert_eq!(p.next_event(), None, "an event is not complete before its blank line");
        p.push(b"\r\n: a comment\n\n");
        assert_eq!(p.next_event().map(|e| e.name), Some("control".into()));
        assert_eq!(p.next_event(), None);
    }
}
