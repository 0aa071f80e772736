//! Stop strings on streamed text: text that might be the start of a stop string is held back
//! until it is known not to be one, so a stop string is never half-printed.

pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What to emit after feeding a piece of text.
pub struct StopCheck {
    /// Text safe to show now.
    pub emit: String,
    /// A stop string was found; `emit` ends just before it.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn feed(&mut self, text: &str) -> StopCheck {
        self.pending.push_str(text);
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let emit = self.pending[..cut].to_string();
            self.pending.clear();
            return StopCheck {
                emit,
                stopped: true,
            };
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let tail = &self.pending[i..];
                if s.starts_with(tail) {
                    hold = hold.max(tail.len());
                    break;
                }
            }
        }
        let split = self.pending.len() - hold;
        let emit = self.pending[..split].to_string();
        self.pending.drain(..split);
        StopCheck {
            emit,
            stopped: false,
        }
    }

    /// Whatever is held back when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_across_pieces_and_holds_partial_match() {
        let mut m = StopMatcher::new(vec!["\n\nUser:".into()]);
        let a = m.feed("Hello\n");
        assert_eq!(a.emit, "Hello");
        assert!(!a.stopped);
        let b = m.feed("\nUs");
        assert_eq!(b.emit, "");
        let c = m.feed("er: more");
        assert!(c.stopped);
        assert_eq!(c.emit, "");
    }

    #[test]
    fn false_alarm_is_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.feed("the E").emit, "the ");
        assert_eq!(m.feed("xit").emit, "Exit");
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn no_stops_passes_through() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.feed("abc").emit, "abc");
    }
}
