//! Text in images without system fonts: the public-domain 8x8 bitmap font of the `font8x8`
//! crate (ASCII; other characters show as `?`), magnified by an integer scale, so labels render
//! identically on any machine.

/// Pixels per glyph side at scale 1.
pub const GLYPH: usize = 8;

/// The 8 rows of `ch` (bit `c` of a row = column `c`).
pub fn glyph(ch: char) -> [u8; 8] {
    let code = if ch.is_ascii() && !ch.is_ascii_control() {
        ch as usize
    } else {
        b'?' as usize
    };
    font8x8::legacy::BASIC_LEGACY[code]
}

/// Draw `text` with its top-left corner at (`x`, `y`) into interleaved RGB8 `rgb` of width
/// `w`; pixels outside the image are skipped.
pub fn draw_text(
    rgb: &mut [u8],
    w: usize,
    x: usize,
    y: usize,
    text: &str,
    scale: usize,
    colour: [u8; 3],
) {
    let h = rgb.len() / 3 / w.max(1);
    for (k, ch) in text.chars().enumerate() {
        for (r, bits) in glyph(ch).iter().enumerate() {
            for c in 0..GLYPH {
                if bits & (1 << c) == 0 {
                    continue;
                }
                let (px, py) = (x + (k * GLYPH + c) * scale, y + r * scale);
                for sy in py..(py + scale).min(h) {
                    for sx in px..(px + scale).min(w) {
                        let d = (sy * w + sx) * 3;
                        rgb[d..d + 3].copy_from_slice(&colour);
                    }
                }
            }
        }
    }
}

/// `text` broken at spaces into lines of at most `width` characters (longer words are cut), at
/// most `max_lines` of them; text that does not fit ends with `..`.
pub fn wrap(text: &str, width: usize, max_lines: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let used = current.chars().count();
            let gap = usize::from(used > 0);
            if used + gap + word.len() <= width {
                if gap == 1 {
                    current.push(' ');
                }
                current.extend(word.iter());
                break;
            }
            if used > 0 {
                lines.push(std::mem::take(&mut current));
                continue;
            }
            // A word longer than a line: cut it.
            lines.push(word[..width].iter().collect());
            word.drain(..width);
            if word.is_empty() {
                break;
            }
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    if lines.len() > max_lines {
        lines.truncate(max_lines.max(1));
        let last = lines.last_mut().expect("at least one line");
        let keep = width.saturating_sub(2).min(last.chars().count());
        *last = last.chars().take(keep).collect::<String>() + "..";
        if last.chars().count() > width {
            *last = last.chars().take(width).collect();
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_at_spaces_cuts_long_words_and_marks_overflow() {
        assert_eq!(wrap("a magenta triangle", 12, 3), ["a magenta", "triangle"]);
        assert_eq!(wrap("abcdefghij", 4, 5), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("one two three four", 8, 2), ["one two", "three.."]);
        assert_eq!(wrap("", 8, 2), Vec::<String>::new());
        assert_eq!(wrap("abc", 1, 1), ["."]);
    }

    #[test]
    fn draws_glyph_pixels_inside_the_image_only() {
        let (w, h) = (20, 10);
        let mut rgb = vec![255u8; w * h * 3];
        draw_text(&mut rgb, w, 15, 4, "AB", 2, [0, 0, 0]);
        let dark = rgb.chunks(3).filter(|p| p[0] == 0).count();
        assert!(dark > 0, "no pixel drawn");
        // nothing left of x = 15 or above y = 4
        for y in 0..h {
            for x in 0..w {
                if x < 15 || y < 4 {
                    assert_eq!(rgb[(y * w + x) * 3], 255, "pixel ({x}, {y}) drawn");
                }
            }
        }
    }
}
