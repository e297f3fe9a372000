//! "Did you mean ...?" for a misspelt name: the known names closest to it.

/// Up to three of `names` close to `word` (a small edit distance, or containing it), closest
/// first.
pub fn closest<'a>(word: &str, names: &[&'a str]) -> Vec<&'a str> {
    let mut scored: Vec<(usize, &'a str)> = names
        .iter()
        .map(|&n| (strsim::damerau_levenshtein(n, word), n))
        .filter(|&(d, n)| d <= 2.max(word.len().min(n.len()) / 3) || n.contains(word))
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().take(3).map(|(_, n)| n).collect()
}

/// ` (did you mean `a` or `b`?)`, or "" when nothing is close.
pub fn did_you_mean(word: &str, names: &[&str]) -> String {
    let close = closest(word, names);
    if close.is_empty() {
        return String::new();
    }
    let quoted: Vec<String> = close.iter().map(|n| format!("`{n}`")).collect();
    format!(" (did you mean {}?)", quoted.join(" or "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_names_are_suggested_and_far_ones_not() {
        let names = ["epochs", "eta", "eval_every", "lr"];
        assert_eq!(closest("epoch", &names), vec!["epochs"]);
        assert!(closest("zzzzzzzz", &names).is_empty());
        assert_eq!(did_you_mean("epoch", &names), " (did you mean `epochs`?)");
        assert_eq!(did_you_mean("qqqqqqqq", &names), "");
    }
}
