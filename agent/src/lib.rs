//! Octopus agent: arrives with the agent issue. Empty on purpose until then.
