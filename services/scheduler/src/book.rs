//! One copy's view of every schedule: what the bucket holds, and when to look at each
//! next. Only the bucket is the truth; a book is rebuilt by watching it.

use std::collections::{BTreeMap, BTreeSet};

use dispatch_proto::api::v1::Schedule;

/// How long a copy waits before it looks again at a schedule whose queued fire waits
/// for a run, or whose fire failed.
pub const RECHECK_MS: i64 = 1000;

#[derive(Debug, Default)]
pub struct Book {
    held: BTreeMap<String, Held>,
    /// `(when to look, id)` of every schedule that is not being fired now.
    due: BTreeSet<(i64, String)>,
    /// The revision each removed schedule was removed at, so an older copy of it
    /// arriving late (a request's own update racing the removal) does not bring it
    /// back. The oldest are forgotten past [`MAX_TOMBSTONES`]; by then every update
    /// older than them has long arrived.
    gone: std::collections::HashMap<String, u64>,
    gone_order: std::collections::VecDeque<String>,
    /// `(short id, id)`: the short id people see is an id's last 12 characters.
    by_short: BTreeSet<(String, String)>,
}

/// How many removals a book remembers.
const MAX_TOMBSTONES: usize = 100_000;

#[derive(Debug)]
struct Held {
    schedule: Schedule,
    revision: u64,
    /// Looked at no sooner than this (a queued fire's recheck, a failed fire's retry).
    not_before: i64,
    /// Being fired by this copy now; it is out of `due` until it is back.
    busy: bool,
}

/// Why no schedule was found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    None,
    Ambiguous(Vec<String>),
}

impl Held {
    /// When to look at it next, if ever.
    fn due_at(&self) -> Option<i64> {
        let s = &self.schedule;
        if s.paused {
            return None;
        }
        let queued = (s.queued_fire_at_ms != 0).then_some(s.queued_fire_at_ms);
        let next = (s.next_fire_at_ms != 0).then_some(s.next_fire_at_ms);
        let at = match (queued, next) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(at.max(self.not_before))
    }
}

impl Book {
    /// Takes what the bucket says of `id` at `revision` (`None`: it is gone), unless the
    /// book already holds a later revision.
    pub fn hold(&mut self, id: &str, entry: Option<(Schedule, u64)>, revision: u64) {
        if let Some(held) = self.held.get(id)
            && held.revision >= revision
        {
            return;
        }
        if self.gone.get(id).is_some_and(|&at| at >= revision) {
            return;
        }
        self.unschedule(id);
        match entry {
            Some((schedule, revision)) => {
                let busy = self.held.get(id).is_some_and(|h| h.busy);
                self.by_short
                    .insert((dispatch_bus::short_id(id).to_owned(), id.to_owned()));
                self.held.insert(
                    id.to_owned(),
                    Held {
                        schedule,
                        revision,
                        not_before: 0,
                        busy,
                    },
                );
                self.reschedule(id);
            }
            None => {
                self.held.remove(id);
                self.by_short
                    .remove(&(dispatch_bus::short_id(id).to_owned(), id.to_owned()));
                if self.gone.insert(id.to_owned(), revision).is_none() {
                    self.gone_order.push_back(id.to_owned());
                    if self.gone_order.len() > MAX_TOMBSTONES
                        && let Some(oldest) = self.gone_order.pop_front()
                    {
                        self.gone.remove(&oldest);
                    }
                }
            }
        }
    }

    /// Takes the result of this copy's own update of `id`, if the book still holds it
    /// (a removal seen meanwhile stands).
    pub fn adopt(&mut self, id: &str, schedule: Schedule, revision: u64) {
        if self.held.contains_key(id) {
            self.hold(id, Some((schedule, revision)), revision);
        }
    }

    /// Looks at `id` again no sooner than `at`.
    pub fn retry(&mut self, id: &str, at: i64) {
        self.unschedule(id);
        if let Some(held) = self.held.get_mut(id) {
            held.not_before = at;
        }
        self.reschedule(id);
    }

    /// Up to `most` schedules due at `now`, each marked busy until [`Self::done`].
    pub fn take_due(&mut self, now: i64, most: usize) -> Vec<(String, Schedule, u64)> {
        let mut taken = Vec::new();
        while taken.len() < most {
            let Some((at, id)) = self.due.first().cloned() else {
                break;
            };
            if at > now {
                break;
            }
            self.due.remove(&(at, id.clone()));
            if let Some(held) = self.held.get_mut(&id) {
                held.busy = true;
                taken.push((id, held.schedule.clone(), held.revision));
            }
        }
        taken
    }

    /// `id` is no longer being fired by this copy.
    pub fn done(&mut self, id: &str) {
        if let Some(held) = self.held.get_mut(id) {
            held.busy = false;
        }
        self.reschedule(id);
    }

    /// When the earliest schedule is due.
    pub fn next_due(&self) -> Option<i64> {
        self.due.first().map(|(at, _)| *at)
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The schedule whose id is `id`, starts with it, or (12 characters) ends with it,
    /// with its revision.
    pub fn find(&self, id: &str) -> Result<(Schedule, u64), Lookup> {
        if let Some(held) = self.held.get(id) {
            return Ok((held.schedule.clone(), held.revision));
        }
        if id.is_empty() {
            return Err(Lookup::None);
        }
        let matches: Vec<&Held> = self
            .held
            .range(id.to_owned()..)
            .take_while(|(key, _)| key.starts_with(id))
            .take(3)
            .map(|(_, held)| held)
            .collect();
        // The short id people see is an id's last 12 characters (as for runs).
        let matches = if matches.is_empty() && id.len() == dispatch_bus::RunId::SHORT_LEN {
            self.by_short
                .range((id.to_owned(), String::new())..)
                .take_while(|(short, _)| short == id)
                .take(3)
                .filter_map(|(_, full)| self.held.get(full))
                .collect()
        } else {
            matches
        };
        match matches.as_slice() {
            [] => Err(Lookup::None),
            [one] => Ok((one.schedule.clone(), one.revision)),
            more => Err(Lookup::Ambiguous(
                more.iter()
                    .map(|h| h.schedule.schedule_id.clone())
                    .collect(),
            )),
        }
    }

    /// Up to `limit` schedules after `after`, in id order, and the id the next page
    /// starts after.
    pub fn page(&self, after: Option<&str>, limit: usize) -> (Vec<Schedule>, Option<String>) {
        let range = match after {
            Some(after) => self
                .held
                .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => self.held.range::<str, _>(..),
        };
        let mut schedules: Vec<Schedule> = range
            .take(limit + 1)
            .map(|(_, h)| h.schedule.clone())
            .collect();
        let next = (schedules.len() > limit).then(|| {
            schedules.truncate(limit);
            schedules.last().map(|s| s.schedule_id.clone())
        });
        (schedules, next.flatten())
    }

    fn unschedule(&mut self, id: &str) {
        if let Some(at) = self.held.get(id).and_then(Held::due_at) {
            self.due.remove(&(at, id.to_owned()));
        }
    }

    fn reschedule(&mut self, id: &str) {
        if let Some(held) = self.held.get(id)
            && !held.busy
            && let Some(at) = held.due_at()
        {
            self.due.insert((at, id.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(id: &str, next: i64) -> Schedule {
        Schedule {
            schedule_id: id.into(),
            next_fire_at_ms: next,
            ..Default::default()
        }
    }

    #[test]
    fn due_schedules_are_handed_out_once_until_done() {
        let mut book = Book::default();
        book.hold("a", Some((schedule("a", 100), 1)), 1);
        book.hold("b", Some((schedule("b", 50), 2)), 2);
        assert_eq!(book.next_due(), Some(50));
        let due = book.take_due(100, 10);
        assert_eq!(
            due.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
            ["b", "a"]
        );
        assert!(
            book.take_due(1000, 10).is_empty(),
            "busy ones are not handed out again"
        );
        // Its own update comes back before the watch's copy of it.
        book.adopt("a", schedule("a", 200), 3);
        book.hold("a", Some((schedule("a", 200), 3)), 3);
        book.done("a");
        assert_eq!(book.next_due(), Some(200));
        // An older revision never replaces a newer one; a removal stands.
        book.hold("a", Some((schedule("a", 100), 1)), 1);
        assert_eq!(book.next_due(), Some(200));
        book.hold("b", None, 4);
        book.adopt("b", schedule("b", 60), 5);
        assert!(book.find("b").is_err());
        // A request's own copy from before the removal does not bring it back.
        book.hold("b", Some((schedule("b", 60), 3)), 3);
        assert!(book.find("b").is_err());
    }

    #[test]
    fn paused_schedules_are_never_due_and_retries_wait() {
        let mut book = Book::default();
        let mut paused = schedule("p", 10);
        paused.paused = true;
        book.hold("p", Some((paused, 1)), 1);
        assert_eq!(book.next_due(), None);
        book.hold("q", Some((schedule("q", 10), 2)), 2);
        let _ = book.take_due(10, 1);
        book.retry("q", 500);
        book.done("q");
        assert_eq!(book.next_due(), Some(500));
    }

    #[test]
    fn ids_are_found_by_prefix_and_paged_in_order() {
        let mut book = Book::default();
        for (i, id) in ["abc1", "abc2", "abd"].iter().enumerate() {
            book.hold(id, Some((schedule(id, 1), i as u64 + 1)), i as u64 + 1);
        }
        assert_eq!(book.find("abd").unwrap().0.schedule_id, "abd");
        assert!(matches!(book.find("abc"), Err(Lookup::Ambiguous(_))));
        assert_eq!(book.find("abc2").unwrap().1, 2);
        assert_eq!(book.find("x"), Err(Lookup::None));
        let (page, next) = book.page(None, 2);
        assert_eq!(page.len(), 2);
        assert_eq!(next.as_deref(), Some("abc2"));
        let (page, next) = book.page(next.as_deref(), 2);
        assert_eq!((page.len(), next), (1, None));
    }
}
