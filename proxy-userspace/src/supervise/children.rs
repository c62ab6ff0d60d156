//! The supervisor's bookkeeping, without I/O: which child serves, which
//! one is starting as its successor, which ones drain, and what of their
//! sd_notify messages reaches the service manager.

/// What a child of the supervisor is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Started, not ready yet: the first agent, or a successor taking over.
    Starting,
    /// Ready; the agent signals are forwarded to.
    Serving,
    /// Taken over by a successor (which took its listeners, or became
    /// ready): drains its sessions.
    Draining,
}

/// What a child's exit means for the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exited {
    /// A successor died before it was ready: the serving agent goes on.
    TakeoverFailed { serving: u32 },
    /// The serving agent exited while a successor was starting (it was
    /// taken over and had nothing to drain): wait for the successor.
    HandedOff,
    /// The last agent that could serve is gone: the service stops.
    NoneServing,
    /// A draining agent is done (or a process that was not ours).
    Drained,
}

/// Sent by an agent a successor took over (see `agent::TAKEN_OVER_KEY`).
const TAKEN_OVER_KEY: &str = crate::agent::TAKEN_OVER_KEY;

/// Keys a child may set in the service manager: never `MAINPID=` (the
/// supervisor stays the main process) nor file-descriptor store requests.
const RELAYED: [&str; 6] = [
    "READY",
    "RELOADING",
    "STOPPING",
    "STATUS",
    "ERRNO",
    "EXTEND_TIMEOUT_USEC",
];

/// The supervisor's children, in the order they were started.
#[derive(Debug, Default)]
pub struct Children {
    list: Vec<(u32, Role)>,
}

impl Children {
    pub fn started(&mut self, pid: u32) {
        self.list.push((pid, Role::Starting));
    }

    pub fn role(&self, pid: u32) -> Option<Role> {
        self.list.iter().find(|(p, _)| *p == pid).map(|(_, r)| *r)
    }

    fn with(&self, role: Role) -> Option<u32> {
        self.list.iter().find(|(_, r)| *r == role).map(|(p, _)| *p)
    }

    /// The agent SIGHUP goes to.
    pub fn serving(&self) -> Option<u32> {
        self.with(Role::Serving)
    }

    /// A successor that is not ready yet, if a takeover is under way.
    pub fn starting(&self) -> Option<u32> {
        self.with(Role::Starting)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.list.iter().map(|(p, _)| *p).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// A child's notify message: what to relay (`None`: nothing). `READY=1`
    /// from a starting child makes it the serving one; the one it replaced
    /// drains. Until an agent first serves, the starting one's progress is
    /// relayed; after that, only the serving agent speaks for the service.
    pub fn notified(&mut self, pid: u32, message: &str) -> Option<String> {
        let role = self.role(pid)?;
        let ready = message.lines().any(|l| l == "READY=1");
        let taken_over = message
            .lines()
            .any(|l| l.split_once('=').is_some_and(|(k, _)| k == TAKEN_OVER_KEY));
        if role == Role::Serving && taken_over {
            // It accepts nothing new: a successor that dies before it is
            // ready leaves no agent serving.
            self.set(pid, Role::Draining);
            let relayed = relayable(message);
            return (!relayed.is_empty()).then_some(relayed);
        }
        let speaks = match role {
            Role::Serving => true,
            Role::Starting if ready => {
                for (_, r) in &mut self.list {
                    if *r == Role::Serving {
                        *r = Role::Draining;
                    }
                }
                self.set(pid, Role::Serving);
                true
            }
            Role::Starting => self.serving().is_none(),
            Role::Draining => false,
        };
        let relayed = relayable(message);
        (speaks && !relayed.is_empty()).then_some(relayed)
    }

    fn set(&mut self, pid: u32, role: Role) {
        if let Some(entry) = self.list.iter_mut().find(|(p, _)| *p == pid) {
            entry.1 = role;
        }
    }

    /// A child exited.
    pub fn exited(&mut self, pid: u32) -> Exited {
        let Some(i) = self.list.iter().position(|(p, _)| *p == pid) else {
            return Exited::Drained;
        };
        let (_, role) = self.list.remove(i);
        match (role, self.serving(), self.starting()) {
            (Role::Draining, ..) => Exited::Drained,
            (Role::Starting, Some(serving), _) => Exited::TakeoverFailed { serving },
            (Role::Serving, None, Some(_)) => Exited::HandedOff,
            (Role::Starting | Role::Serving, ..) => Exited::NoneServing,
        }
    }
}

/// The lines of `message` a child may send for the service.
fn relayable(message: &str) -> String {
    message
        .lines()
        .filter(|line| {
            line.split_once('=')
                .is_some_and(|(key, _)| RELAYED.contains(&key))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serving_one() -> Children {
        let mut children = Children::default();
        children.started(10);
        assert_eq!(
            children.notified(10, "READY=1\nSTATUS=serving"),
            Some("READY=1\nSTATUS=serving".into())
        );
        children
    }

    #[test]
    fn the_first_agent_speaks_before_and_after_ready() {
        let mut children = Children::default();
        children.started(10);
        assert_eq!(
            children.notified(10, "STATUS=loading"),
            Some("STATUS=loading".into())
        );
        assert_eq!(children.notified(10, "READY=1"), Some("READY=1".into()));
        assert_eq!(children.serving(), Some(10));
        assert_eq!(
            children.notified(10, "RELOADING=1"),
            Some("RELOADING=1".into())
        );
    }

    #[test]
    fn mainpid_and_unknown_keys_are_dropped() {
        let mut children = serving_one();
        assert_eq!(
            children.notified(10, "MAINPID=99\nSTATUS=x\nFDSTORE=1"),
            Some("STATUS=x".into())
        );
        assert_eq!(children.notified(10, "MAINPID=99"), None);
    }

    #[test]
    fn strangers_are_not_relayed() {
        let mut children = serving_one();
        assert_eq!(children.notified(77, "READY=1\nSTATUS=evil"), None);
        assert_eq!(children.serving(), Some(10));
    }

    #[test]
    fn a_ready_successor_takes_over_and_the_old_agent_drains_silently() {
        let mut children = serving_one();
        children.started(11);
        assert_eq!(children.starting(), Some(11));
        assert_eq!(children.notified(11, "STATUS=loading"), None);
        assert_eq!(children.notified(11, "READY=1"), Some("READY=1".into()));
        assert_eq!(children.serving(), Some(11));
        assert_eq!(children.role(10), Some(Role::Draining));
        assert_eq!(children.notified(10, "STATUS=draining 3 sessions"), None);
        assert_eq!(children.exited(10), Exited::Drained);
        assert_eq!(children.pids(), vec![11]);
    }

    #[test]
    fn a_successor_dying_before_ready_leaves_the_old_agent_serving() {
        let mut children = serving_one();
        children.started(11);
        assert_eq!(children.exited(11), Exited::TakeoverFailed { serving: 10 });
        assert_eq!(children.serving(), Some(10));
        assert_eq!(children.starting(), None);
    }

    #[test]
    fn the_old_agent_leaving_before_its_successor_is_ready_is_a_handoff() {
        let mut children = serving_one();
        children.started(11);
        assert_eq!(children.exited(10), Exited::HandedOff);
        assert_eq!(children.notified(11, "READY=1"), Some("READY=1".into()));
        assert_eq!(children.exited(11), Exited::NoneServing);
        assert!(children.is_empty());
    }

    #[test]
    fn the_serving_agent_exiting_alone_stops_the_service() {
        let mut children = serving_one();
        assert_eq!(children.exited(10), Exited::NoneServing);
        let mut first = Children::default();
        first.started(20);
        assert_eq!(first.exited(20), Exited::NoneServing, "config error");
    }

    #[test]
    fn a_successor_dying_after_it_took_the_listeners_leaves_none_serving() {
        let mut children = serving_one();
        children.started(11);
        let taken =
            format!("{TAKEN_OVER_KEY}=11\nSTATUS=taken over by pid 11; draining 1 sessions");
        assert_eq!(
            children.notified(10, &taken),
            Some("STATUS=taken over by pid 11; draining 1 sessions".into()),
            "relayed without the supervisor's own key"
        );
        assert_eq!(children.role(10), Some(Role::Draining));
        assert_eq!(children.serving(), None);
        assert_eq!(children.exited(11), Exited::NoneServing);
        assert_eq!(children.exited(10), Exited::Drained);
    }

    #[test]
    fn taken_over_then_ready_is_an_ordinary_takeover() {
        let mut children = serving_one();
        children.started(11);
        children.notified(10, &format!("{TAKEN_OVER_KEY}=11"));
        assert_eq!(children.notified(11, "READY=1"), Some("READY=1".into()));
        assert_eq!(children.serving(), Some(11));
        assert_eq!(children.exited(10), Exited::Drained);
    }
}
