//! The MC146818 CMOS/RTC at ports 0x70 (index) and 0x71 (data), enough for
//! what Linux reads at boot: the wall clock (BCD, 24-hour) with the
//! "update in progress" bit clear, so its polling loops end at once.

use std::time::{SystemTime, UNIX_EPOCH};

pub const INDEX_PORT: u16 = 0x70;
pub const DATA_PORT: u16 = 0x71;

mod reg {
    pub const SECONDS: u8 = 0x00;
    pub const MINUTES: u8 = 0x02;
    pub const HOURS: u8 = 0x04;
    pub const WEEKDAY: u8 = 0x06;
    pub const DAY: u8 = 0x07;
    pub const MONTH: u8 = 0x08;
    pub const YEAR: u8 = 0x09;
    pub const STATUS_A: u8 = 0x0a;
    pub const STATUS_B: u8 = 0x0b;
    pub const STATUS_C: u8 = 0x0c;
    pub const STATUS_D: u8 = 0x0d;
    pub const CENTURY: u8 = 0x32;
}

/// Date and time (UTC) of a Unix time, for the RTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: u32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 1 = Sunday, as the RTC counts.
    pub weekday: u32,
}

impl DateTime {
    /// Howard Hinnant's days-to-civil algorithm.
    pub fn from_unix(seconds: u64) -> Self {
        let days = (seconds / 86_400) as i64;
        let rest = seconds % 86_400;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
        DateTime {
            year,
            month,
            day,
            hour: (rest / 3600) as u32,
            minute: (rest / 60 % 60) as u32,
            second: (rest % 60) as u32,
            weekday: ((days + 4).rem_euclid(7) + 1) as u32, // 1970-01-01 was a Thursday
        }
    }
}

fn bcd(value: u32) -> u8 {
    ((((value / 10) % 10) << 4) | (value % 10)) as u8
}

#[derive(Default)]
pub struct Cmos {
    index: u8,
}

impl Cmos {
    pub fn handles(port: u16) -> bool {
        port == INDEX_PORT || port == DATA_PORT
    }

    pub fn write(&mut self, port: u16, value: u8) {
        if port == INDEX_PORT {
            // Bit 7 is the NMI mask, not part of the index.
            self.index = value & 0x7f;
        }
        // Writes to the clock or the status registers are ignored: the guest
        // always reads the host's time.
    }

    pub fn read(&self, port: u16) -> u8 {
        if port == INDEX_PORT {
            return self.index;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self::register(self.index, &DateTime::from_unix(now))
    }

    pub fn register(index: u8, time: &DateTime) -> u8 {
        match index {
            reg::SECONDS => bcd(time.second),
            reg::MINUTES => bcd(time.minute),
            reg::HOURS => bcd(time.hour),
            reg::WEEKDAY => bcd(time.weekday),
            reg::DAY => bcd(time.day),
            reg::MONTH => bcd(time.month),
            reg::YEAR => bcd(time.year % 100),
            reg::CENTURY => bcd(time.year / 100),
            reg::STATUS_A => 0x26, // 32.768 kHz base, 1024 Hz rate, no update in progress
            reg::STATUS_B => 0x02, // 24-hour, BCD, no interrupts enabled
            reg::STATUS_C => 0,
            reg::STATUS_D => 0x80, // valid RAM and time
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_bcd() {
        let t = DateTime::from_unix(0);
        assert_eq!((t.year, t.month, t.day, t.weekday), (1970, 1, 1, 5));
        // 2026-11-30 08:16:18 UTC, a Monday.
        let t = DateTime::from_unix(1_796_026_578);
        assert_eq!((t.year, t.month, t.day), (2026, 11, 30));
        assert_eq!((t.hour, t.minute, t.second, t.weekday), (8, 16, 18, 2));
        assert_eq!(Cmos::register(reg::YEAR, &t), 0x26);
        assert_eq!(Cmos::register(reg::CENTURY, &t), 0x20);
        assert_eq!(Cmos::register(reg::MONTH, &t), 0x11);
        assert_eq!(Cmos::register(reg::HOURS, &t), 0x08);
        // 2024-02-29 (leap day).
        let t = DateTime::from_unix(1_709_164_800);
        assert_eq!((t.year, t.month, t.day), (2024, 2, 29));
    }

    #[test]
    fn index_and_update_in_progress() {
        let mut cmos = Cmos::default();
        cmos.write(INDEX_PORT, 0x80 | reg::STATUS_A);
        assert_eq!(cmos.read(INDEX_PORT), reg::STATUS_A, "NMI bit masked");
        assert_eq!(cmos.read(DATA_PORT) & 0x80, 0, "UIP clear");
        cmos.write(INDEX_PORT, reg::STATUS_D);
        assert_eq!(cmos.read(DATA_PORT), 0x80);
    }
}
