//! The admission rule as a pure function over values: a token, the domain's
//! marks and what is known of its leader go in, a [`Decision`] comes out.
//! No I/O happens here; the gate ([`crate::gate`]) does the waiting and
//! calls this again after every wait, which is rule 5's re-check.

use crate::error::Reason;
use crate::token::Token;

/// The two numbers of a domain the rule compares against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    /// The highest token made durable.
    pub epoch: u64,
    /// The highest token a raise has begun for; never below `epoch`.
    pub refusal: u64,
}

/// What is known of the domain's election when deciding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leader {
    /// The domain has no election: rule 3 does not apply.
    NotElected,
    /// The leader view, and whether it was confirmed by a read that started
    /// after the request arrived (so it cannot be behind the writer).
    View {
        /// The leader's revision, `None` when there is no candidate.
        revision: Option<u64>,
        /// Whether the view comes from a read made after the request arrived.
        confirmed: bool,
    },
    /// The view is too old to decide and `on_unavailable = "local"`: the
    /// epoch rule decides, capped by the highest leader revision ever seen.
    Local {
        /// The highest leader revision seen (0 if none).
        highest: u64,
        /// When the view's last word was "no candidate" at etcd revision
        /// R: R, since every key created up to R is gone and its token
        /// deposed; 0 otherwise.
        deposed_through: u64,
    },
    /// The view is too old to decide, or its confirmation failed.
    Unavailable,
    /// etcd answered below the epoch: its history cannot be trusted.
    Regressed,
}

/// Whether the request may change the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A read that carries a token: checked, never raises.
    Read,
    /// A write.
    Write,
}

/// What to do with a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Forward it: all rules hold.
    Forward,
    /// The token is above the epoch: raise the epoch to it, then decide again.
    Raise,
    /// The leader view may be behind: read etcd, then decide again.
    Confirm,
    /// Refuse it.
    Refuse(Reason),
}

/// Decides one request with token `token` against the domain's state.
pub fn decide(token: Token, marks: Marks, leader: Leader, access: Access) -> Decision {
    let t = token.get();
    // etcd lost history: its leaders' tokens may sit below the epoch, so
    // rule 2 would tell the real leader it is fenced and send it to campaign
    // in a loop. Every write waits for an operator instead.
    if leader == Leader::Regressed {
        return Decision::Refuse(Reason::CoordinatorRegressed);
    }
    // Rule 2: below the refusal mark is stale, whatever the leader view says.
    if t < marks.refusal {
        return Decision::Refuse(Reason::StaleEpoch);
    }
    // Rule 3: the leader check, for domains with an election.
    match leader {
        // Regressed was answered above.
        Leader::NotElected | Leader::Regressed => {}
        Leader::View { revision, confirmed } => match revision {
            Some(l) if t == l => {}
            Some(l) if t < l => return Decision::Refuse(Reason::SupersededLeader),
            // No candidate, or a token above the leader: the view may be
            // behind the writer, so only a fresh read may refuse it.
            _ if !confirmed => return Decision::Confirm,
            None => return Decision::Refuse(Reason::NoLeader),
            Some(_) => return Decision::Refuse(Reason::NotLeader),
        },
        Leader::Unavailable => return Decision::Refuse(Reason::CoordinatorUnavailable),
        Leader::Local {
            highest,
            deposed_through,
        } => {
            // Without etcd, a token below a leader once seen is certainly
            // deposed, and so is one whose key etcd showed gone (no
            // candidate left); one above every leader seen (and above the
            // epoch) cannot be told from a forged or future one, and with
            // no candidate last seen, no token is a confirmed leader.
            if t < highest || t <= deposed_through {
                return Decision::Refuse(Reason::SupersededLeader);
            }
            if deposed_through > 0 || t > highest.max(marks.epoch) {
                return Decision::Refuse(Reason::CoordinatorUnavailable);
            }
        }
    }
    // Rule 4: a write above the epoch raises it first; reads never raise.
    if access == Access::Write && t > marks.epoch {
        return Decision::Raise;
    }
    Decision::Forward
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tok(v: u64) -> Token {
        Token::new(v).unwrap()
    }

    const PLAIN: Leader = Leader::NotElected;

    #[test]
    fn epoch_rule_without_election() {
        let marks = Marks { epoch: 5, refusal: 5 };
        assert_eq!(
            decide(tok(4), marks, PLAIN, Access::Write),
            Decision::Refuse(Reason::StaleEpoch)
        );
        assert_eq!(decide(tok(5), marks, PLAIN, Access::Write), Decision::Forward);
        assert_eq!(decide(tok(6), marks, PLAIN, Access::Write), Decision::Raise);
        assert_eq!(decide(tok(6), marks, PLAIN, Access::Read), Decision::Forward);
        assert_eq!(
            decide(tok(4), marks, PLAIN, Access::Read),
            Decision::Refuse(Reason::StaleEpoch)
        );
    }

    #[test]
    fn a_pending_raise_refuses_the_old_epoch() {
        let marks = Marks { epoch: 5, refusal: 9 };
        assert_eq!(
            decide(tok(5), marks, PLAIN, Access::Write),
            Decision::Refuse(Reason::StaleEpoch)
        );
        assert_eq!(decide(tok(9), marks, PLAIN, Access::Write), Decision::Raise);
    }

    #[test]
    fn leader_rule() {
        let marks = Marks { epoch: 5, refusal: 5 };
        let view = |revision, confirmed| Leader::View { revision, confirmed };
        let w = Access::Write;
        assert_eq!(decide(tok(7), marks, view(Some(7), false), w), Decision::Raise);
        assert_eq!(
            decide(tok(6), marks, view(Some(7), false), w),
            Decision::Refuse(Reason::SupersededLeader)
        );
        assert_eq!(decide(tok(8), marks, view(Some(7), false), w), Decision::Confirm);
        assert_eq!(
            decide(tok(8), marks, view(Some(7), true), w),
            Decision::Refuse(Reason::NotLeader)
        );
        assert_eq!(decide(tok(8), marks, view(None, false), w), Decision::Confirm);
        assert_eq!(
            decide(tok(8), marks, view(None, true), w),
            Decision::Refuse(Reason::NoLeader)
        );
        assert_eq!(
            decide(tok(4), marks, view(Some(4), true), w),
            Decision::Refuse(Reason::StaleEpoch)
        );
    }

    #[test]
    fn without_a_usable_view() {
        let marks = Marks { epoch: 5, refusal: 5 };
        let w = Access::Write;
        let local = Leader::Local {
            highest: 5,
            deposed_through: 0,
        };
        assert_eq!(decide(tok(5), marks, local, w), Decision::Forward);
        assert_eq!(
            decide(tok(6), marks, local, w),
            Decision::Refuse(Reason::CoordinatorUnavailable)
        );
        assert_eq!(
            decide(tok(4), marks, local, w),
            Decision::Refuse(Reason::StaleEpoch)
        );
        // The highest leader seen is above the epoch: its holder may raise,
        // anything below it is deposed.
        let ahead = Leader::Local {
            highest: 9,
            deposed_through: 0,
        };
        assert_eq!(decide(tok(9), marks, ahead, w), Decision::Raise);
        assert_eq!(
            decide(tok(7), marks, ahead, w),
            Decision::Refuse(Reason::SupersededLeader)
        );
        // The view's last word was "no candidate" at revision 7: the
        // leader at 5 is deposed, and nobody is a confirmed leader.
        let leaderless = Leader::Local {
            highest: 5,
            deposed_through: 7,
        };
        assert_eq!(
            decide(tok(5), marks, leaderless, w),
            Decision::Refuse(Reason::SupersededLeader)
        );
        assert_eq!(
            decide(tok(8), marks, leaderless, w),
            Decision::Refuse(Reason::CoordinatorUnavailable)
        );
        assert_eq!(
            decide(tok(5), marks, Leader::Unavailable, w),
            Decision::Refuse(Reason::CoordinatorUnavailable)
        );
        assert_eq!(
            decide(tok(5), marks, Leader::Regressed, w),
            Decision::Refuse(Reason::CoordinatorRegressed)
        );
        assert_eq!(
            decide(tok(4), marks, Leader::Regressed, w),
            Decision::Refuse(Reason::CoordinatorRegressed),
            "a regressed etcd's leaders sit below the epoch: they must not be sent to campaign again"
        );
    }

    fn leader() -> impl Strategy<Value = Leader> {
        prop_oneof![
            Just(Leader::NotElected),
            Just(Leader::Unavailable),
            Just(Leader::Regressed),
            (0u64..20, prop_oneof![Just(0u64), 1u64..20]).prop_map(|(highest, deposed_through)| {
                Leader::Local {
                    highest,
                    deposed_through: if deposed_through == 0 {
                        0
                    } else {
                        deposed_through.max(highest)
                    },
                }
            }),
            (proptest::option::of(1u64..20), any::<bool>())
                .prop_map(|(revision, confirmed)| { Leader::View { revision, confirmed } }),
        ]
    }

    proptest! {
        #[test]
        fn forward_only_when_every_rule_holds(
            t in 1u64..20, epoch in 0u64..20, extra in 0u64..3, leader in leader(), write in any::<bool>(),
        ) {
            let marks = Marks { epoch, refusal: epoch + extra };
            let access = if write { Access::Write } else { Access::Read };
            let decision = decide(tok(t), marks, leader, access);
            if decision == Decision::Forward {
                prop_assert!(t >= marks.refusal, "forwarded below the refusal mark");
                if write {
                    prop_assert!(t <= marks.epoch, "forwarded a write above the durable epoch");
                }
                match leader {
                    Leader::View { revision, .. } => {
                        prop_assert_eq!(revision, Some(t), "forwarded a token that is not the leader's");
                    }
                    Leader::Local { highest, deposed_through } => {
                        prop_assert!(t >= highest && t <= highest.max(marks.epoch));
                        prop_assert_eq!(deposed_through, 0, "forwarded with no candidate last seen");
                    }
                    Leader::Unavailable | Leader::Regressed => prop_assert!(false, "forwarded without etcd"),
                    Leader::NotElected => {}
                }
            }
            if decision == Decision::Raise {
                prop_assert!(write && t > marks.epoch && t >= marks.refusal);
            }
            if decision == Decision::Confirm {
                let unconfirmed = matches!(leader, Leader::View { confirmed: false, .. });
                prop_assert!(unconfirmed, "asked to confirm a confirmed view");
            }
        }
    }
}
