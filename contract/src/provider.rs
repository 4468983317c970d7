//! The translation providers a chat server can call, as the CRD, the configuration and the flags name them.

use serde::{Deserialize, Serialize};

/// Translation providers.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Apertium APY: rule-based, self-hosted.
    #[default]
    Apertium,
    /// LibreTranslate: neural, self-hosted.
    Libretranslate,
}

impl Provider {
    /// The name in the CRD, the configuration and `MessageTranslated.provider`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Apertium => "apertium",
            Self::Libretranslate => "libretranslate",
        }
    }

    /// Whether the provider can detect the source language (`sourceLanguage: auto`).
    pub fn detects_language(self) -> bool {
        match self {
            Self::Apertium => false,
            Self::Libretranslate => true,
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
