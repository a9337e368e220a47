//! TODO(session): driver
