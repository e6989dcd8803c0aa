//! telemeter-client: scrapes an isolated Prometheus, cleans and anonymizes, pushes to telemeter-server.
#![deny(missing_docs)]
