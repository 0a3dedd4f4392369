//! PCI addresses as the host names them: domain:bus:device.function.

use std::fmt;
use std::str::FromStr;

/// A host PCI address ("0000:17:00.0"; "17:00.0" means domain 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

#[derive(Debug, thiserror::Error)]
#[error("{text:?} is not a PCI address: expected DOMAIN:BUS:DEVICE.FUNCTION in hex, e.g. 0000:17:00.0 (as in /sys/bus/pci/devices or lspci -D)")]
pub struct BdfError {
    pub text: String,
}

impl FromStr for Bdf {
    type Err = BdfError;

    fn from_str(text: &str) -> Result<Self, BdfError> {
        let error = || BdfError {
            text: text.to_string(),
        };
        let (rest, function) = text.rsplit_once('.').ok_or_else(error)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [domain, bus, device] => (*domain, *bus, *device),
            [bus, device] => ("0", *bus, *device),
            _ => return Err(error()),
        };
        let hex = |s: &str, max_len: usize| {
            if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                Err(error())
            } else {
                u32::from_str_radix(s, 16).map_err(|_| error())
            }
        };
        let device = hex(device, 2)?;
        let function = hex(function, 1)?;
        if device > 31 || function > 7 {
            return Err(error());
        }
        Ok(Bdf {
            domain: hex(domain, 4)? as u16,
            bus: hex(bus, 2)? as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_sysfs_names() {
        let bdf: Bdf = "0000:ca:1f.7".parse().unwrap();
        assert_eq!(
            bdf,
            Bdf {
                domain: 0,
                bus: 0xca,
                device: 0x1f,
                function: 7
            }
        );
        assert_eq!(bdf.to_string(), "0000:ca:1f.7");
        assert_eq!(
            "17:00.0".parse::<Bdf>().unwrap().to_string(),
            "0000:17:00.0"
        );
        for bad in [
            "",
            "0000:17:00",
            "0000:17:20.0",
            "0000:17:00.8",
            "x:17:00.0",
            "0000:117:00.0",
            "1:2:3:4.0",
        ] {
            let error = bad.parse::<Bdf>().unwrap_err();
            assert!(error.to_string().contains("0000:17:00.0"), "{error}");
        }
    }
}
