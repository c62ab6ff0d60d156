//! Routed flows across a takeover (or a restart after a crash). The tc
//! filters outlive the agent and go on forwarding its flows; a new agent
//! attaches its own programs with a fresh `FLOWS`, which would not know
//! them, so their packets would fall to the intercepting path and the
//! flows would break. Before the new programs replace the old ones, the
//! new agent copies every open flow of the pinned `FLOWS` it finds into its
//! own map, and copies again once its programs are attached, for flows
//! opened in between. Counters move on exactly: the programs count by
//! sequence number, so bytes the old program passed after the copy are
//! counted by the new one at the flow's next segment.

use std::collections::HashSet;
use std::path::Path;

use aya::maps::{HashMap, MapData};
use proxy_common::routed::{FLOW_OPEN, FlowKey, FlowValue};

/// `BPF_NOEXIST`: never overwrite what the new programs already track.
const NOEXIST: u64 = 1;

/// The previous agent's `FLOWS`, while its flows are carried over.
pub struct Previous {
    map: HashMap<MapData, FlowKey, FlowValue>,
}

impl Previous {
    /// The map pinned at `pin`, if an agent left one there.
    #[must_use]
    pub fn open(pin: &Path) -> Option<Self> {
        let data = MapData::from_pin(pin).ok()?;
        let map = HashMap::try_from(aya::maps::Map::HashMap(data))
            .inspect_err(|e| tracing::warn!(error = %e, "the pinned FLOWS of a previous agent has another layout; its routed flows are not carried over"))
            .ok()?;
        Some(Self { map })
    }

    /// Copies every open flow not yet in `into`; returns the keys copied.
    pub fn carry(&self, into: &mut HashMap<MapData, FlowKey, FlowValue>) -> HashSet<FlowKey> {
        let mut carried = HashSet::new();
        for (key, flow) in self.map.iter().filter_map(Result::ok) {
            if flow.state == FLOW_OPEN
                && !flow.is_removed()
                && into.insert(key, flow, NOEXIST).is_ok()
            {
                carried.insert(key);
            }
        }
        carried
    }
}
