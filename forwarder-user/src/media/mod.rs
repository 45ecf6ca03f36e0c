//! The media engine and its packet operations: SRTP, the fan-out, NACK cache, RTCP.
//! No sockets and no clock reads here: the data paths (socket or AF_XDP) feed packets
//! in with the time and send what comes out.

pub mod srtp;
