//! The parts of `cargo xtask bench`, each runnable alone (`--part NAME`), each writing
//! `<out-dir>/<name>.json` and `<name>.md`.
pub mod http;
pub mod sidecars;
pub mod tcp;
pub mod tenants;
pub mod xds;

use std::path::PathBuf;

/// What every part gets.
#[derive(Debug, Clone)]
pub struct Common {
    pub out_dir: PathBuf,
    /// A short smoke run: numbers not worth publishing.
    pub quick: bool,
}

/// Writes a part's JSON and Markdown, and prints the Markdown.
pub fn write(
    common: &Common,
    name: &str,
    json: &impl serde::Serialize,
    md: &str,
) -> anyhow::Result<()> {
    let path = common.out_dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(json)?)?;
    std::fs::write(common.out_dir.join(format!("{name}.md")), md)?;
    println!("{md}");
    println!("results: {} and {name}.md", path.display());
    Ok(())
}

/// The median of `values`.
pub fn median(values: &[f64]) -> f64 {
    crate::paths::median(values)
}

/// `max - min` of `values`.
pub fn spread(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::MIN, f64::max)
        - values.iter().copied().fold(f64::MAX, f64::min)
}
