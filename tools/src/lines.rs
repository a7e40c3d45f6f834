//! Whole output lines per host, out of the chunks a task's event stream delivers.
//!
//! Why this exists: agents send output in chunks that split lines anywhere, chunks
//! of many hosts interleave, and the center keeps only the most recent events of a
//! task, so a follower that falls behind finds a gap. Printing chunks as they come
//! spliced lines of different hosts together, and gluing the text on either side of
//! a gap made lines that no host printed.
//!
//! The rules:
//! - Text is buffered per host and stream until a newline; only whole lines are
//!   printed, each as `host: line`.
//! - A partial line is capped at [`MAX_LINE`] bytes: past it, the first part is
//!   printed ending in [`CONTINUES`] and the rest follows on the next line.
//! - After a gap in the event sequence, text that may have lost its neighbours is
//!   marked: a buffered partial line is printed ending in [`CUT`], and the first
//!   fragment a stream delivers after the gap (up to its newline) starts with [`CUT`].

use std::collections::BTreeMap;

/// Longest partial line buffered per host and stream.
pub const MAX_LINE: usize = 64 << 10;

/// Ends a piece of a line longer than [`MAX_LINE`]; the line goes on below.
pub const CONTINUES: &str = " [line continues]";

/// Marks text next to output the center dropped.
pub const CUT: &str = "[cut]";

/// Which stream a line goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Default)]
struct Partial {
    text: String,
    /// The gap count this stream has seen a newline after: if lower than the
    /// splicer's, its next fragment may be the tail of a line whose head was dropped.
    synced: u64,
}

/// Turns interleaved chunks into whole, prefixed lines.
#[derive(Debug, Default)]
pub struct Splicer {
    partial: BTreeMap<(String, Stream), Partial>,
    /// Gaps seen so far.
    gaps: u64,
}

impl Splicer {
    /// Events were lost: every buffered partial line is flushed as cut, and each
    /// stream's next fragment is marked as such.
    pub fn gap(&mut self, emit: &mut dyn FnMut(Stream, String)) {
        self.gaps += 1;
        for ((host, stream), p) in &mut self.partial {
            if !p.text.is_empty() {
                emit(
                    *stream,
                    format!("{host}: {} {CUT}", std::mem::take(&mut p.text)),
                );
            }
        }
    }

    /// Adds a chunk of `host`'s `stream`, emitting every line it completes.
    pub fn push(
        &mut self,
        host: &str,
        stream: Stream,
        data: &str,
        emit: &mut dyn FnMut(Stream, String),
    ) {
        let gaps = self.gaps;
        let p = self.partial.entry((host.to_string(), stream)).or_default();
        let mut rest = data;
        while !rest.is_empty() {
            let (piece, newline) = match rest.find('\n') {
                Some(nl) => (&rest[..nl], true),
                None => (rest, false),
            };
            rest = &rest[(piece.len() + usize::from(newline)).min(rest.len())..];
            if p.synced < gaps && p.text.is_empty() {
                // The first text after a gap: its start may be gone.
                p.text.push_str(CUT);
                p.text.push(' ');
            }
            p.text.push_str(piece);
            if newline {
                p.synced = gaps;
                emit(stream, format!("{host}: {}", std::mem::take(&mut p.text)));
                continue;
            }
            while p.text.len() > MAX_LINE {
                let at = floor_boundary(&p.text, MAX_LINE);
                let tail = p.text.split_off(at);
                let head = std::mem::replace(&mut p.text, tail);
                emit(stream, format!("{host}: {head}{CONTINUES}"));
            }
        }
    }

    /// The end of the output: what is left of every partial line is printed, marked
    /// [`CUT`] where `cut(host, stream)` says that stream was truncated.
    pub fn finish(
        &mut self,
        emit: &mut dyn FnMut(Stream, String),
        cut: impl Fn(&str, Stream) -> bool,
    ) {
        for ((host, stream), p) in std::mem::take(&mut self.partial) {
            if p.text.is_empty() {
                continue;
            }
            if cut(&host, stream) {
                emit(stream, format!("{host}: {} {CUT}", p.text));
            } else {
                emit(stream, format!("{host}: {}", p.text));
            }
        }
    }
}

/// The largest char boundary at or below `at`.
fn floor_boundary(s: &str, mut at: usize) -> usize {
    while at > 0 && !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(f: impl FnOnce(&mut Splicer, &mut dyn FnMut(Stream, String))) -> Vec<String> {
        let mut out = Vec::new();
        let mut s = Splicer::default();
        let mut emit = |_: Stream, l: String| out.push(l);
        f(&mut s, &mut emit);
        s.finish(&mut emit, |h, _| h == "cut");
        out
    }

    #[test]
    fn interleaved_chunks_make_whole_lines() {
        let out = run(|s, e| {
            s.push("a", Stream::Stdout, "abc", &mut *e);
            s.push("b", Stream::Stdout, "xy", &mut *e);
            s.push("a", Stream::Stdout, "def\nghi", &mut *e);
            s.push("b", Stream::Stdout, "z\n", &mut *e);
            s.push("a", Stream::Stdout, "\n", &mut *e);
            s.push("a", Stream::Stdout, "end", &mut *e);
            s.push("cut", Stream::Stdout, "half", &mut *e);
        });
        assert_eq!(
            out,
            ["a: abcdef", "b: xyz", "a: ghi", "a: end", "cut: half [cut]"]
        );
    }

    #[test]
    fn a_gap_marks_both_sides() {
        let out = run(|s, e| {
            s.push("a", Stream::Stdout, "one\nabcdefghij", &mut *e);
            s.gap(&mut *e);
            s.push("a", Stream::Stdout, "ghijkl\nnext\n", &mut *e);
            s.push("b", Stream::Stderr, "tail\nwhole\n", &mut *e);
        });
        assert_eq!(
            out,
            [
                "a: one",
                "a: abcdefghij [cut]",
                "a: [cut] ghijkl",
                "a: next",
                "b: [cut] tail",
                "b: whole"
            ]
        );
    }

    #[test]
    fn long_lines_are_flushed_in_pieces_at_the_cap() {
        let long = "é".repeat(MAX_LINE); // two bytes a char
        let out = run(|s, e| {
            s.push("a", Stream::Stdout, &long, &mut *e);
            s.push("a", Stream::Stdout, "\n", &mut *e);
        });
        assert_eq!(out.len(), 2);
        assert!(out[0].ends_with(CONTINUES));
        assert_eq!(out[0].len(), "a: ".len() + MAX_LINE + CONTINUES.len());
        let joined: String = out
            .iter()
            .map(|l| l.trim_start_matches("a: ").trim_end_matches(CONTINUES))
            .collect();
        assert_eq!(joined, long);
    }
}
