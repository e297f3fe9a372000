//! Numbers as a person reads them in reports: integers whole, ordinary magnitudes with four
//! significant digits, very small or very large ones in scientific notation (a learning rate of
//! 1e-5 must not read 0.0000).

/// Significant digits of a number that is not a whole number.
const SIGNIFICANT: i32 = 4;

/// `v` for a report: `0`, `500`, `0.2443`, `123.5`, `1e-5`, `2.5e-7`, `1.235e9`, `NaN`, `inf`.
pub fn format_number(v: f64) -> String {
    format_significant(v, SIGNIFICANT)
}

/// `v` with at most `digits` significant digits (trailing zeros dropped): whole numbers below
/// 1e9 in full, magnitudes below 1e-3 or from 1e6 in scientific notation.
pub fn format_significant(v: f64, digits: i32) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "NaN".into()
        } else if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    if v == 0.0 {
        return "0".into();
    }
    let digits = digits.clamp(1, 17);
    let magnitude = v.abs();
    if v.fract() == 0.0 && magnitude < 1e9 {
        return format!("{v:.0}");
    }
    if (1e-3..1e6).contains(&magnitude) {
        // Decimals so that `digits` digits show, then trailing zeros dropped.
        let exponent = magnitude.log10().floor() as i32;
        let decimals = (digits - 1 - exponent).max(0) as usize;
        return trim_zeros(&format!("{v:.decimals$}"));
    }
    let text = format!("{v:.prec$e}", prec = (digits - 1) as usize);
    let (mantissa, exponent) = text.split_once('e').expect("`{:e}` has an exponent");
    format!("{}e{exponent}", trim_zeros(mantissa))
}

/// An axis tick label of `v` on an axis spanning `lo..hi`: by magnitude like
/// [`format_number`], with just enough digits to tell ticks about a sixth of the span apart
/// (0.6925 next to 0.693, 1.2e-5 next to 1.4e-5).
pub fn format_tick(v: f64, lo: f64, hi: f64) -> String {
    let step = (hi - lo).abs() / 6.0;
    let largest = lo.abs().max(hi.abs());
    if !(step > 0.0 && step.is_finite() && largest.is_finite()) {
        return format_number(v);
    }
    if v.abs() < step * 1e-6 {
        return "0".into();
    }
    let digits = largest.log10().floor() - step.log10().floor() + 2.0;
    format_significant(v, digits as i32)
}

/// [`format_number`] with an explicit `+` on positive values (changes and interval ends).
pub fn format_signed(v: f64) -> String {
    if v > 0.0 {
        format!("+{}", format_number(v))
    } else {
        format_number(v)
    }
}

/// `0.2500` -> `0.25`, `1.000` -> `1`; text without a decimal point is unchanged.
fn trim_zeros(s: &str) -> String {
    if !s.contains('.') {
        return s.to_string();
    }
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::{format_number, format_signed, format_tick};

    #[test]
    fn small_and_large_magnitudes_are_scientific() {
        assert_eq!(format_number(1e-5), "1e-5");
        assert_eq!(format_number(2.5e-7), "2.5e-7");
        assert_eq!(format_number(-3.14159e-4), "-3.142e-4");
        assert_eq!(format_number(1.23456e12), "1.235e12");
        assert_eq!(format_number(2_500_000.5), "2.5e6");
        assert_eq!(format_number(2.5e6), "2500000");
    }

    #[test]
    fn ordinary_magnitudes_keep_four_significant_digits() {
        assert_eq!(format_number(0.24431), "0.2443");
        assert_eq!(format_number(0.30000000000000004), "0.3");
        assert_eq!(format_number(123.456), "123.5");
        assert_eq!(format_number(0.0012345), "0.001234");
        assert_eq!(format_number(-0.5), "-0.5");
        assert_eq!(format_number(38.0843), "38.08");
    }

    #[test]
    fn whole_numbers_and_specials() {
        assert_eq!(format_number(0.0), "0");
        assert_eq!(format_number(-0.0), "0");
        assert_eq!(format_number(500.0), "500");
        assert_eq!(format_number(-12.0), "-12");
        assert_eq!(format_number(3e9), "3e9");
        assert_eq!(format_number(f64::NAN), "NaN");
        assert_eq!(format_number(f64::INFINITY), "inf");
        assert_eq!(format_number(f64::NEG_INFINITY), "-inf");
    }

    #[test]
    fn ticks_get_the_digits_their_spacing_needs() {
        // plotters' own labels read 0.00001 / 0.00002 for every tick of this axis
        let ticks: Vec<String> = [1e-5, 1.2e-5, 1.4e-5, 2e-5]
            .iter()
            .map(|&v| format_tick(v, 0.95e-5, 2.05e-5))
            .collect();
        assert_eq!(ticks, ["1e-5", "1.2e-5", "1.4e-5", "2e-5"]);
        assert_eq!(format_tick(0.6925, 0.6919, 0.6932), "0.6925");
        assert_eq!(format_tick(0.30000000000000004, 0.0, 1.0), "0.3");
        assert_eq!(format_tick(1.0, 0.0, 2.0), "1");
        assert_eq!(format_tick(1e-17, -1.0, 1.0), "0");
        assert_eq!(format_tick(5e-6, -1e-5, 1e-5), "5e-6");
        assert_eq!(format_tick(2.0, 2.0, 2.0), "2");
    }

    #[test]
    fn signed_marks_positive_values() {
        assert_eq!(format_signed(0.0833), "+0.0833");
        assert_eq!(format_signed(-0.0833), "-0.0833");
        assert_eq!(format_signed(0.0), "0");
        assert_eq!(format_signed(1e-5), "+1e-5");
    }
}
