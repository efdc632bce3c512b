//! Sessions: a conversation's KV cache kept between its turns, so that a follow-up turn only
//! prefills what is new.
//!
//! The session whose cache is in the backend is *resident* and costs nothing to keep; when
//! another request needs the backend, the resident session's cached positions are saved into
//! the [`SessionStore`], which is bounded in count and bytes (`sessions.max_count`,
//! `sessions.max_bytes`) and evicts the least recently used first. A saved session is loaded
//! back into the backend when its next turn comes.

use crate::api::status::SessionStats;
use crate::api::Message;

/// One conversation.
#[derive(Debug, Default)]
pub struct Session {
    pub id: String,
    /// Whose it is: sessions of different owners are different sessions, whatever their ids.
    pub owner: String,
    /// The conversation so far: the messages of every turn and the replies.
    pub messages: Vec<Message>,
    /// The text the cached tokens stand for, as the chat template rendered it, up to the end of
    /// the last reply (tokens evicted by the window included): a follow-up turn continues the
    /// cache when its rendering starts with this.
    pub text: String,
    /// Tokens in the cache, in order (the window's evictions removed); the last one may not be
    /// cached yet (`cached` says how many are).
    pub tokens: Vec<u32>,
    pub cached: usize,
    /// The backend state of positions `0..cached`, while the session is not resident.
    pub kv: Vec<u8>,
    pub turns: usize,
    last_used: u64,
}

impl Session {
    pub fn new(owner: &str, id: &str) -> Session {
        Session {
            id: id.into(),
            owner: owner.into(),
            ..Default::default()
        }
    }

    /// Bytes this session takes in the store.
    pub fn bytes(&self) -> u64 {
        let msgs: usize = self
            .messages
            .iter()
            .map(|m| m.role.len() + m.content.len() + std::mem::size_of::<Message>())
            .sum();
        (self.kv.capacity()
            + self.text.capacity()
            + self.tokens.capacity() * 4
            + msgs
            + self.id.len()
            + self.owner.len()
            + std::mem::size_of::<Session>()) as u64
    }
}

/// Saved sessions, least recently used first out.
#[derive(Debug, Default)]
pub struct SessionStore {
    max_count: usize,
    max_bytes: u64,
    saved: Vec<Session>,
    clock: u64,
    evicted: u64,
}

impl SessionStore {
    pub fn new(max_count: usize, max_bytes: u64) -> SessionStore {
        SessionStore {
            max_count,
            max_bytes,
            ..Default::default()
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_count > 0
    }

    /// Takes `owner`'s session `id` out of the store.
    pub fn take(&mut self, owner: &str, id: &str) -> Option<Session> {
        let i = self
            .saved
            .iter()
            .position(|s| s.id == id && s.owner == owner)?;
        Some(self.saved.swap_remove(i))
    }

    /// Room for one more session besides `resident` of them: evicts the least recently used
    /// until the count allows it. Returns the ids evicted.
    pub fn make_room(&mut self, resident: usize) -> Vec<String> {
        let mut out = Vec::new();
        while !self.saved.is_empty() && self.saved.len() + resident + 1 > self.max_count {
            out.push(self.evict_oldest());
        }
        out
    }

    fn evict_oldest(&mut self) -> String {
        let i = self
            .saved
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.last_used)
            .map_or(0, |(i, _)| i);
        self.evicted += 1;
        self.saved.swap_remove(i).id
    }

    /// Saves `s`, evicting the least recently used sessions until count and bytes fit
    /// (`resident` more sessions are counted as held). A session larger than the whole store
    /// is not kept. Returns the ids evicted, `s`'s own when it was not kept.
    pub fn put(&mut self, mut s: Session, resident: usize) -> Vec<String> {
        let b = s.bytes();
        if self.max_count <= resident || b > self.max_bytes {
            self.evicted += 1;
            return vec![s.id];
        }
        let mut out = Vec::new();
        while !self.saved.is_empty()
            && (self.saved.len() + resident + 1 > self.max_count
                || self.bytes() + b > self.max_bytes)
        {
            out.push(self.evict_oldest());
        }
        self.clock += 1;
        s.last_used = self.clock;
        self.saved.push(s);
        out
    }

    pub fn bytes(&self) -> u64 {
        self.saved.iter().map(Session::bytes).sum()
    }

    pub fn stats(&self, resident: usize) -> SessionStats {
        SessionStats {
            held: self.saved.len() + resident,
            bytes: self.bytes(),
            max_count: self.max_count,
            max_bytes: self.max_bytes,
            evicted: self.evicted,
        }
    }
}
