//! Token bytes to streamed text.
//!
//! Two things make streaming harder than decoding at the end: a multi-byte UTF-8 character can be
//! split across tokens (its first bytes are held until the rest arrive), and a stop string can
//! span tokens (text that could be the start of a stop string is held until it is known not to
//! be). What reaches the sink is exactly the final text, in order.

use super::Sink;

pub struct TextStream<'a> {
    stops: &'a [String],
    /// Everything decoded so far (cut at a stop string once one is found).
    text: String,
    /// Bytes of `text` already given to the sink.
    emitted: usize,
    /// An incomplete UTF-8 sequence at the end of the bytes so far (at most 3 bytes).
    carry: heapless::Vec<u8, 4>,
    /// Reused buffer joining `carry` and a new token's bytes.
    buf: Vec<u8>,
    stopped: bool,
}

impl<'a> TextStream<'a> {
    pub fn new(stops: &'a [String]) -> TextStream<'a> {
        TextStream {
            stops,
            text: String::new(),
            emitted: 0,
            carry: heapless::Vec::new(),
            buf: Vec::with_capacity(64),
            stopped: false,
        }
    }

    /// Adds one token's bytes; sends what is now certain to the sink. Returns true when a stop
    /// string was found (the text ends before it and nothing more may be pushed).
    pub fn push(&mut self, bytes: &[u8], sink: &mut dyn Sink) -> bool {
        if self.stopped {
            return true;
        }
        self.buf.clear();
        self.buf.extend_from_slice(&self.carry);
        self.buf.extend_from_slice(bytes);
        self.carry.clear();
        let mut rest = &self.buf[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    self.text.push_str(s);
                    break;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    if let Ok(s) = std::str::from_utf8(&rest[..good]) {
                        self.text.push_str(s);
                    }
                    match e.error_len() {
                        None => {
                            // An unfinished character at the end: wait for its other bytes.
                            for &b in &rest[good..] {
                                let _ = self.carry.push(b);
                            }
                            break;
                        }
                        Some(n) => {
                            self.text.push(char::REPLACEMENT_CHARACTER);
                            rest = &rest[good + n..];
                        }
                    }
                }
            }
        }
        let pending = &self.text[self.emitted..];
        let mut cut: Option<usize> = None;
        for s in self.stops.iter().filter(|s| !s.is_empty()) {
            if let Some(i) = pending.find(s.as_str()) {
                cut = Some(cut.map_or(i, |c: usize| c.min(i)));
            }
        }
        if let Some(i) = cut {
            self.text.truncate(self.emitted + i);
            self.flush(sink);
            self.stopped = true;
            return true;
        }
        let hold = self.held_back();
        let upto = self.text.len() - hold;
        if upto > self.emitted {
            sink.text(&self.text[self.emitted..upto]);
            self.emitted = upto;
        }
        false
    }

    /// Length of the longest end of the pending text that starts some stop string.
    fn held_back(&self) -> usize {
        let pending = &self.text[self.emitted..];
        let mut hold = 0;
        for s in self.stops {
            for k in (1..s.len()).rev() {
                if k <= hold {
                    break;
                }
                if s.is_char_boundary(k) && pending.ends_with(&s[..k]) {
                    hold = k;
                    break;
                }
            }
        }
        hold
    }

    fn flush(&mut self, sink: &mut dyn Sink) {
        if self.text.len() > self.emitted {
            sink.text(&self.text[self.emitted..]);
            self.emitted = self.text.len();
        }
    }

    /// End of generation: whatever was held back is final now.
    pub fn finish(&mut self, sink: &mut dyn Sink) {
        if !self.stopped && !self.carry.is_empty() {
            self.text.push(char::REPLACEMENT_CHARACTER);
            self.carry.clear();
        }
        self.flush(sink);
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    pub fn into_text(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&[u8]]) -> (Vec<String>, String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut ts = TextStream::new(&stops);
        let mut chunks: Vec<String> = Vec::new();
        struct Collect<'a>(&'a mut Vec<String>);
        impl Sink for Collect<'_> {
            fn text(&mut self, t: &str) {
                self.0.push(t.to_string());
            }
        }
        let mut stopped = false;
        for p in pieces {
            if ts.push(p, &mut Collect(&mut chunks)) {
                stopped = true;
                break;
            }
        }
        ts.finish(&mut Collect(&mut chunks));
        (chunks, ts.into_text(), stopped)
    }

    #[test]
    fn split_utf8_is_joined() {
        let e = "é".as_bytes();
        let (chunks, text, _) = run(&[], &[b"caf", &e[..1], &e[1..], b"!"]);
        assert_eq!(text, "café!");
        assert_eq!(chunks.concat(), text);
        assert!(chunks.iter().all(|c| !c.contains('\u{fffd}')));
    }

    #[test]
    fn invalid_bytes_become_replacement() {
        let (_, text, _) = run(&[], &[b"a\xffb", b"\xe2\x82"]);
        assert_eq!(text, "a\u{fffd}b\u{fffd}");
    }

    #[test]
    fn stop_string_across_tokens_is_cut_and_never_streamed() {
        let (chunks, text, stopped) = run(
            &["\n\nUser:"],
            &[b"Hello", b"\n", b"\nUs", b"er:", b" more"],
        );
        assert!(stopped);
        assert_eq!(text, "Hello");
        assert_eq!(chunks.concat(), "Hello");
    }

    #[test]
    fn held_prefix_is_released_when_it_is_not_a_stop() {
        let (chunks, text, stopped) = run(&["END"], &[b"the EN", b"D"]);
        assert!(stopped);
        assert_eq!(text, "the ");
        let (chunks2, text2, stopped2) = run(&["END"], &[b"the EN", b"ough"]);
        assert!(!stopped2);
        assert_eq!(text2, "the ENough");
        assert_eq!(chunks2.concat(), text2);
        assert_eq!(chunks.concat(), text);
    }
}
