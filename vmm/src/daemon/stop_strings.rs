//! Stop strings of a completion, found in the streamed text: text that may
//! be the start of a stop string is held back until it is known not to be,
//! so a client never sees any part of a stop string.

pub struct StopStrings {
    stops: Vec<String>,
    held: String,
}

/// What to send after one piece of text.
#[derive(Debug, PartialEq, Eq)]
pub struct Step {
    pub emit: String,
    /// A stop string was found: the completion ends before it.
    pub stopped: bool,
}

impl StopStrings {
    pub fn new(stops: &[String]) -> StopStrings {
        StopStrings {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, piece: &str) -> Step {
        if self.stops.is_empty() {
            return Step {
                emit: piece.to_string(),
                stopped: false,
            };
        }
        self.held.push_str(piece);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(at) = first_stop {
            let emit = self.held[..at].to_string();
            self.held.clear();
            return Step {
                emit,
                stopped: true,
            };
        }
        // Hold back the longest tail that is a prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|stop| longest_suffix_prefix(&self.held, stop))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let emit = self.held[..cut].to_string();
        self.held.drain(..cut);
        Step {
            emit,
            stopped: false,
        }
    }

    /// The text held back when the completion ends without a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Bytes of the longest suffix of `text` that is a proper prefix of `stop`,
/// on character boundaries.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && stop.starts_with(&text[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut matcher = StopStrings::new(&stops);
        let mut out = String::new();
        for piece in pieces {
            let step = matcher.push(piece);
            out.push_str(&step.emit);
            if step.stopped {
                return (out, true);
            }
        }
        out.push_str(&matcher.finish());
        (out, false)
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_never_sent() {
        assert_eq!(
            run(&["\n\n"], &["Hello", "\n", "\nWorld"]),
            ("Hello".into(), true)
        );
        assert_eq!(
            run(&["END"], &["abcE", "N", "D tail"]),
            ("abc".into(), true)
        );
    }

    #[test]
    fn held_text_that_turns_out_not_to_stop_is_sent() {
        assert_eq!(
            run(&["END"], &["abcE", "Nx", "y"]),
            ("abcENxy".into(), false)
        );
        assert_eq!(run(&["END"], &["tail E"]), ("tail E".into(), false));
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        assert_eq!(run(&["bb", "a"], &["xxbba"]), ("xx".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        assert_eq!(run(&["é!"], &["caf", "é", "é!"]), ("café".into(), true));
        assert_eq!(run(&["日本"], &["日", "x"]), ("日x".into(), false));
    }
}
