//! Recent translations, so a text said again (greetings, thanks, the same announcement in many chats)
//! costs no provider call. Bounded in entries and in the length of what it keeps.

use std::{num::NonZeroUsize, sync::Mutex};

use lru::LruCache;

/// Longest text (in bytes) worth remembering: chat texts repeat when they are short.
const MAX_TEXT_BYTES: usize = 512;

/// (source language, target language, text), in one string: language codes hold no control characters.
fn key(from: &str, to: &str, text: &str) -> String {
    let mut key = String::with_capacity(from.len() + to.len() + text.len() + 2);
    for part in [from, "\u{1f}", to, "\u{1f}", text] {
        key.push_str(part);
    }
    key
}

/// A least-recently-used map of (source language, target language, text) to its translation. One
/// translator has one provider, so the provider needs no place in the key.
pub struct TranslationCache {
    entries: Option<Mutex<LruCache<String, String>>>,
}

impl TranslationCache {
    /// Remembers at most `entries` translations; 0 remembers none.
    pub fn new(entries: usize) -> Self {
        Self { entries: NonZeroUsize::new(entries).map(|n| Mutex::new(LruCache::new(n))) }
    }

    pub fn get(&self, from: &str, to: &str, text: &str) -> Option<String> {
        let entries = self.entries.as_ref()?;
        entries.lock().expect("cache lock").get(&key(from, to, text)).cloned()
    }

    pub fn put(&self, from: &str, to: &str, text: &str, translation: &str) {
        if let Some(entries) = &self.entries {
            if text.len() <= MAX_TEXT_BYTES {
                entries.lock().expect("cache lock").put(key(from, to, text), translation.to_owned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_translation_goes_first() {
        let cache = TranslationCache::new(2);
        cache.put("en", "es", "hello", "hola");
        cache.put("en", "es", "thanks", "gracias");
        assert_eq!(cache.get("en", "es", "hello").as_deref(), Some("hola"));
        cache.put("en", "es", "bye", "adiós");
        assert_eq!(cache.get("en", "es", "thanks"), None, "evicted");
        assert_eq!(cache.get("en", "ca", "hello"), None, "per language pair");
    }

    #[test]
    fn long_texts_and_a_zero_size_are_not_remembered() {
        let cache = TranslationCache::new(4);
        let long = "x".repeat(MAX_TEXT_BYTES + 1);
        cache.put("en", "es", &long, "y");
        assert_eq!(cache.get("en", "es", &long), None);
        let off = TranslationCache::new(0);
        off.put("en", "es", "hello", "hola");
        assert_eq!(off.get("en", "es", "hello"), None);
    }
}
