//! The inference device (layouts in `aivmm_guest_abi::inference`): the host
//! writes requests into a buffer the guest keeps available on the request
//! queue; the guest writes events (tokens, end of generation, errors) into
//! buffers on the event queue and notifies at most once per generated token.
//!
//! Nothing here blocks or raises interrupts. The guest polls the request
//! queue's used ring; the VMM drains the event queue when the guest's
//! notification arrives (through an ioeventfd, on a host thread, or through
//! the transport's QUEUE_NOTIFY handler when no ioeventfd is registered).

use std::sync::mpsc::Sender;

use aivmm_guest_abi::inference::{self as abi, EventHeader, ReadyInfo, RequestHeader};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::VirtioDevice;
use crate::bus::DeviceError;
use crate::GuestMemory;

const NAME: &str = "inference";

/// One event from the guest, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum InferenceEvent {
    /// The model is loaded, the session allocated and the memory warm.
    Ready(ReadyInfo),
    /// The prompt of `request_id` was fed (`tsc`: when feeding ended).
    PromptProcessed {
        request_id: u64,
        tsc: u64,
        n_context: u64,
        n_fed: u64,
        n_reused: u64,
        received_tsc: u64,
        tokenized_tsc: u64,
    },
    /// A generated token and the text it completes (`tsc`: when sampled).
    Token {
        request_id: u64,
        tsc: u64,
        id: u32,
        text: String,
    },
    /// More text for the request (appended to what came before).
    Text { request_id: u64, text: String },
    /// Generation ended with `stop` (`aivmm_guest_abi::inference::STOP_*`).
    End {
        request_id: u64,
        tsc: u64,
        stop: u64,
        tokens: u64,
        heap_peak: u64,
        notifications: u64,
    },
    /// The request failed (`code`: `aivmm_guest_abi::inference::ERROR_*`).
    Error {
        request_id: u64,
        code: u64,
        message: String,
    },
}

/// Why the host could not hand a request to the guest.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(
        "the guest has no request buffer available (it is still busy with an earlier request)"
    )]
    NoBuffer,
    #[error(
        "the request needs {needed} bytes but the guest's request buffer holds {available}; \
         shorten the prompt (or give the partition a larger --ctx-size, which sizes the buffer)"
    )]
    TooLarge { needed: usize, available: usize },
    #[error(transparent)]
    Guest(#[from] DeviceError),
}

/// The inference device; decoded events go to `events`.
pub struct InferenceDevice {
    events: Sender<InferenceEvent>,
    queue_max_sizes: [u16; 2],
    events_drained: u64,
    requests_submitted: u64,
}

fn queue_error(queue: u16, why: String) -> DeviceError {
    DeviceError::Queue {
        device: NAME,
        queue,
        why,
    }
}

fn memory_error(addr: u64, source: vm_memory::GuestMemoryError) -> DeviceError {
    DeviceError::GuestMemory {
        device: NAME,
        addr,
        source,
    }
}

impl InferenceDevice {
    pub fn new(events: Sender<InferenceEvent>) -> Self {
        InferenceDevice {
            events,
            queue_max_sizes: [abi::REQUEST_QUEUE_MAX_SIZE, abi::EVENT_QUEUE_MAX_SIZE],
            events_drained: 0,
            requests_submitted: 0,
        }
    }

    /// Event buffers consumed so far.
    pub fn events_drained(&self) -> u64 {
        self.events_drained
    }

    /// Requests written into guest buffers so far.
    pub fn requests_submitted(&self) -> u64 {
        self.requests_submitted
    }

    /// Decodes every event buffer the guest made available, forwards the
    /// events and returns the buffers. Returns how many were drained.
    pub fn drain_events(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemory,
    ) -> Result<usize, DeviceError> {
        let mut drained = 0;
        while let Some(mut chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let Some(descriptor) = chain.next() else {
                return Err(queue_error(
                    abi::EVENT_QUEUE,
                    format!("event chain {head} has no descriptor"),
                ));
            };
            if chain.next().is_some() {
                return Err(queue_error(
                    abi::EVENT_QUEUE,
                    format!("event chain {head} has more than one descriptor"),
                ));
            }
            if descriptor.is_write_only() {
                return Err(queue_error(
                    abi::EVENT_QUEUE,
                    format!("event buffer {head} is device-writable; events are device-readable"),
                ));
            }
            let len = descriptor.len() as usize;
            if !(abi::EVENT_HEADER_BYTES..=abi::EVENT_SLOT_BYTES).contains(&len) {
                return Err(queue_error(
                    abi::EVENT_QUEUE,
                    format!(
                        "event buffer {head} is {len} bytes; events are {} to {} bytes",
                        abi::EVENT_HEADER_BYTES,
                        abi::EVENT_SLOT_BYTES
                    ),
                ));
            }
            let mut bytes = vec![0u8; len];
            memory
                .read_slice(&mut bytes, descriptor.addr())
                .map_err(|source| memory_error(descriptor.addr().0, source))?;
            let event = decode_event(&bytes)?;
            queue.add_used(memory, head, 0).map_err(|error| {
                queue_error(
                    abi::EVENT_QUEUE,
                    format!("cannot return event buffer {head}: {error}"),
                )
            })?;
            drained += 1;
            self.events_drained += 1;
            // The receiver is gone only while the partition is being torn down.
            let _ = self.events.send(event);
        }
        Ok(drained)
    }

    /// Writes a request (header and payload) into the request buffer the
    /// guest keeps available and puts it in the used ring. The caller then
    /// wakes vCPU 0, which polls that ring (and parks when idle).
    pub fn submit(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemory,
        header: &RequestHeader,
        payload: &[u8],
    ) -> Result<(), SubmitError> {
        let needed = abi::REQUEST_HEADER_BYTES + payload.len();
        let mut chain = queue
            .pop_descriptor_chain(memory)
            .ok_or(SubmitError::NoBuffer)?;
        let head = chain.head_index();
        let descriptor = chain.next().ok_or_else(|| {
            queue_error(
                abi::REQUEST_QUEUE,
                format!("request chain {head} has no descriptor"),
            )
        })?;
        if !descriptor.is_write_only() {
            // Left available: the request cannot be delivered either way.
            put_back(queue);
            return Err(queue_error(
                abi::REQUEST_QUEUE,
                format!("request buffer {head} is not device-writable"),
            )
            .into());
        }
        let available = descriptor.len() as usize;
        if needed > available {
            put_back(queue);
            return Err(SubmitError::TooLarge { needed, available });
        }
        let base = descriptor.addr();
        let header_bytes = RequestHeader {
            payload_len: payload.len() as u32,
            ..*header
        }
        .to_bytes();
        let payload_addr = GuestAddress(base.0 + abi::REQUEST_HEADER_BYTES as u64);
        memory
            .write_slice(payload, payload_addr)
            .and_then(|()| memory.write_slice(&header_bytes, base))
            .map_err(|source| memory_error(base.0, source))?;
        queue
            .add_used(memory, head, needed as u32)
            .map_err(|error| {
                queue_error(
                    abi::REQUEST_QUEUE,
                    format!("cannot return request buffer {head}: {error}"),
                )
            })?;
        self.requests_submitted += 1;
        Ok(())
    }
}

/// Un-pops the chain just popped, so that it stays available to the device.
fn put_back(queue: &mut Queue) {
    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
}

fn text_of(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

/// One event buffer (header and payload) as an [`InferenceEvent`].
fn decode_event(bytes: &[u8]) -> Result<InferenceEvent, DeviceError> {
    let mut header_bytes = [0u8; abi::EVENT_HEADER_BYTES];
    header_bytes.copy_from_slice(&bytes[..abi::EVENT_HEADER_BYTES]);
    let header = EventHeader::from_bytes(&header_bytes);
    let payload_len = header.payload_len as usize;
    let payload = bytes
        .get(abi::EVENT_HEADER_BYTES..abi::EVENT_HEADER_BYTES + payload_len)
        .ok_or_else(|| {
            queue_error(
                abi::EVENT_QUEUE,
                format!(
                    "event kind {} claims {payload_len} payload bytes but its buffer has {}",
                    header.kind,
                    bytes.len() - abi::EVENT_HEADER_BYTES
                ),
            )
        })?;
    let request_id = header.request_id;
    let values = header.values;
    Ok(match header.kind {
        abi::EVENT_READY => {
            let info: &[u8; abi::READY_INFO_BYTES] = payload.try_into().map_err(|_| {
                queue_error(
                    abi::EVENT_QUEUE,
                    format!(
                        "the ready event carries {payload_len} bytes, not {}",
                        abi::READY_INFO_BYTES
                    ),
                )
            })?;
            InferenceEvent::Ready(ReadyInfo::from_bytes(info))
        }
        abi::EVENT_PROMPT_PROCESSED => InferenceEvent::PromptProcessed {
            request_id,
            tsc: header.tsc,
            n_context: values[abi::PROMPT_N_CONTEXT],
            n_fed: values[abi::PROMPT_N_FED],
            n_reused: values[abi::PROMPT_N_REUSED],
            received_tsc: values[abi::PROMPT_RECEIVED_TSC],
            tokenized_tsc: values[abi::PROMPT_TOKENIZED_TSC],
        },
        abi::EVENT_TOKEN => InferenceEvent::Token {
            request_id,
            tsc: header.tsc,
            id: u32::try_from(values[abi::TOKEN_ID]).map_err(|_| {
                queue_error(
                    abi::EVENT_QUEUE,
                    format!("token id {} does not fit 32 bits", values[abi::TOKEN_ID]),
                )
            })?,
            text: text_of(payload),
        },
        abi::EVENT_TEXT => InferenceEvent::Text {
            request_id,
            text: text_of(payload),
        },
        abi::EVENT_END => InferenceEvent::End {
            request_id,
            tsc: header.tsc,
            stop: values[abi::END_STOP_REASON],
            tokens: values[abi::END_TOKENS],
            heap_peak: values[abi::END_HEAP_PEAK],
            notifications: values[abi::END_NOTIFICATIONS],
        },
        abi::EVENT_ERROR => InferenceEvent::Error {
            request_id,
            code: values[abi::ERROR_CODE],
            message: text_of(payload),
        },
        other => {
            return Err(queue_error(
                abi::EVENT_QUEUE,
                format!("unknown event kind {other}"),
            ))
        }
    })
}

impl VirtioDevice for InferenceDevice {
    fn name(&self) -> &'static str {
        NAME
    }

    fn device_type(&self) -> u32 {
        abi::DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        memory: &GuestMemory,
    ) -> Result<(), DeviceError> {
        match index {
            abi::EVENT_QUEUE => self.drain_events(queue, memory).map(|_| ()),
            // The host fills request buffers when it has a request, not when
            // the guest makes them available.
            _ => Ok(()),
        }
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::MmioDevice;
    use crate::virtio::mmio::VirtioMmioTransport;
    use crate::virtio::test_driver::write32;
    use aivmm_guest_abi::virtio_mmio as reg;
    use std::sync::mpsc;

    /// Queue memory of the test driver: (descriptors, avail, used) per queue.
    const QUEUES: [(u64, u64, u64); 2] = [(0x1000, 0x2000, 0x3000), (0x4000, 0x5000, 0x6000)];

    fn set_up(
        memory: &GuestMemory,
    ) -> (
        VirtioMmioTransport<InferenceDevice>,
        mpsc::Receiver<InferenceEvent>,
    ) {
        let (sender, receiver) = mpsc::channel();
        let transport =
            VirtioMmioTransport::new(InferenceDevice::new(sender), memory.clone()).unwrap();
        let mut data = [0u8; 4];
        transport.read(0, reg::DEVICE_ID, &mut data).unwrap();
        assert_eq!(u32::from_le_bytes(data), abi::DEVICE_ID);
        write32(
            &transport,
            reg::STATUS,
            reg::STATUS_ACKNOWLEDGE | reg::STATUS_DRIVER,
        );
        write32(&transport, reg::DRIVER_FEATURES_SEL, 1);
        write32(&transport, reg::DRIVER_FEATURES, 1);
        let features_ok = reg::STATUS_ACKNOWLEDGE | reg::STATUS_DRIVER | reg::STATUS_FEATURES_OK;
        write32(&transport, reg::STATUS, features_ok);
        for (index, (desc, avail, used)) in QUEUES.iter().enumerate() {
            write32(&transport, reg::QUEUE_SEL, index as u32);
            write32(&transport, reg::QUEUE_NUM, 4);
            write32(&transport, reg::QUEUE_DESC_LOW, *desc as u32);
            write32(&transport, reg::QUEUE_DRIVER_LOW, *avail as u32);
            write32(&transport, reg::QUEUE_DEVICE_LOW, *used as u32);
            write32(&transport, reg::QUEUE_READY, 1);
        }
        write32(&transport, reg::STATUS, features_ok | reg::STATUS_DRIVER_OK);
        (transport, receiver)
    }

    /// Makes descriptor 0 of `queue` (a buffer at `addr`) available.
    fn offer(
        memory: &GuestMemory,
        queue: usize,
        addr: u64,
        len: u32,
        writable: bool,
        avail_idx: u16,
    ) {
        let (desc, avail, _) = QUEUES[queue];
        memory.write_obj(addr, GuestAddress(desc)).unwrap();
        memory.write_obj(len, GuestAddress(desc + 8)).unwrap();
        let flags: u16 = if writable { 2 } else { 0 };
        memory.write_obj(flags, GuestAddress(desc + 12)).unwrap();
        memory
            .write_obj(
                0u16,
                GuestAddress(avail + 4 + 2 * ((avail_idx - 1) % 4) as u64),
            )
            .unwrap();
        memory
            .write_obj(avail_idx, GuestAddress(avail + 2))
            .unwrap();
    }

    #[test]
    fn a_request_lands_in_the_guest_buffer() {
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap();
        let (transport, _events) = set_up(&memory);
        let header = RequestHeader {
            kind: abi::REQUEST_GENERATE,
            request_id: 9,
            max_tokens: 5,
            ..RequestHeader::default()
        };
        let submit = |payload: &[u8]| {
            transport
                .with_live_queue(abi::REQUEST_QUEUE, |device, queue, memory| {
                    device.submit(queue, memory, &header, payload)
                })
                .expect("the queue is live")
        };
        assert!(matches!(submit(b"hi"), Err(SubmitError::NoBuffer)));

        offer(&memory, 0, 0x8000, 128, true, 1);
        assert!(matches!(
            submit(&[7u8; 100]),
            Err(SubmitError::TooLarge {
                needed: 164,
                available: 128
            })
        ));
        submit(b"hello").unwrap();
        let mut bytes = [0u8; abi::REQUEST_HEADER_BYTES];
        memory.read_slice(&mut bytes, GuestAddress(0x8000)).unwrap();
        let written = RequestHeader::from_bytes(&bytes);
        assert_eq!((written.request_id, written.payload_len), (9, 5));
        let mut payload = [0u8; 5];
        memory
            .read_slice(&mut payload, GuestAddress(0x8040))
            .unwrap();
        assert_eq!(&payload, b"hello");
        let used = QUEUES[0].2;
        assert_eq!(memory.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 1);
        assert_eq!(memory.read_obj::<u32>(GuestAddress(used + 8)).unwrap(), 69);
        assert_eq!(
            transport.with_device(InferenceDevice::requests_submitted),
            1
        );
    }

    #[test]
    fn events_are_decoded_and_their_buffers_returned() {
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap();
        let (transport, events) = set_up(&memory);
        let header = EventHeader {
            kind: abi::EVENT_TOKEN,
            payload_len: 6,
            request_id: 3,
            tsc: 1000,
            values: [42, 0, 0, 0, 0],
        };
        memory
            .write_slice(&header.to_bytes(), GuestAddress(0x9000))
            .unwrap();
        memory.write_slice(b" world", GuestAddress(0x9040)).unwrap();
        offer(&memory, 1, 0x9000, 70, false, 1);
        // Through QUEUE_NOTIFY, as when no ioeventfd is registered.
        write32(&transport, reg::QUEUE_NOTIFY, abi::EVENT_QUEUE as u32);
        assert_eq!(
            events.try_recv().unwrap(),
            InferenceEvent::Token {
                request_id: 3,
                tsc: 1000,
                id: 42,
                text: " world".into()
            }
        );
        let used = QUEUES[1].2;
        assert_eq!(memory.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 1);

        // A payload longer than the buffer is a guest error.
        let lying = EventHeader {
            payload_len: 4000,
            ..header
        };
        memory
            .write_slice(&lying.to_bytes(), GuestAddress(0x9000))
            .unwrap();
        offer(&memory, 1, 0x9000, 70, false, 2);
        let error = transport
            .with_live_queue(abi::EVENT_QUEUE, |device, queue, memory| {
                device.drain_events(queue, memory)
            })
            .unwrap()
            .unwrap_err();
        assert!(
            error.to_string().contains("claims 4000 payload bytes"),
            "{error}"
        );
    }
}
