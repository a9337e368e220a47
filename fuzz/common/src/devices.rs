//! TODO(session): devices
