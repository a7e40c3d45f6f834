//! Octopus center: arrives with the control-plane issue. Empty on purpose until then.
