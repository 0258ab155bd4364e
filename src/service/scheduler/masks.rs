//! Token masks of constrained requests, computed on a helper thread while the step's forward
//! pass runs: a mask depends only on the tokens so far, so it is ready (or nearly) when the
//! logits are. Each step lends the guides out and takes each back just before its request
//! samples.

use std::sync::mpsc::{channel, Receiver};
use std::thread::Scope;

use crate::generate::Decoding;
use crate::guide::Guide;

/// The guides lent out for one step, by the index of their request in the step.
pub(super) struct LentGuides {
    arrivals: Option<Receiver<(usize, Guide)>>,
    waiting: Vec<usize>,
    arrived: Vec<(usize, Guide)>,
}

impl LentGuides {
    /// Lends the guide of every decoding that has one to a thread of `scope` that computes
    /// their next masks.
    pub fn lend<'scope, 'env, 'd, 't: 'd>(
        scope: &'scope Scope<'scope, 'env>,
        decodings: impl Iterator<Item = (usize, &'d mut Decoding<'t>)>,
    ) -> Self {
        let lent: Vec<(usize, Guide)> = decodings
            .filter_map(|(k, d)| d.lend_guide().map(|g| (k, g)))
            .collect();
        let waiting: Vec<usize> = lent.iter().map(|(k, _)| *k).collect();
        if lent.is_empty() {
            return Self {
                arrivals: None,
                waiting,
                arrived: Vec::new(),
            };
        }
        let (send, arrivals) = channel();
        scope.spawn(move || {
            for (k, mut guide) in lent {
                // An error is found again (and reported) when the request samples.
                let _ = guide.prepare();
                if send.send((k, guide)).is_err() {
                    return;
                }
            }
        });
        Self {
            arrivals: Some(arrivals),
            waiting,
            arrived: Vec::new(),
        }
    }

    /// Gives request `k` its guide back, waiting for its mask if need be. False if the guide
    /// was lost (the mask thread panicked): the request must not go on unconstrained.
    pub fn give_back(&mut self, k: usize, decoding: &mut Decoding) -> bool {
        let Some(slot) = self.waiting.iter().position(|&i| i == k) else {
            return true;
        };
        self.waiting.swap_remove(slot);
        loop {
            if let Some(pos) = self.arrived.iter().position(|(i, _)| *i == k) {
                decoding.return_guide(self.arrived.swap_remove(pos).1);
                return true;
            }
            match self.arrivals.as_ref().map(Receiver::recv) {
                Some(Ok(arrival)) => self.arrived.push(arrival),
                _ => return false,
            }
        }
    }

    /// The requests whose guides are still out.
    pub fn outstanding(&self) -> Vec<usize> {
        self.waiting.clone()
    }
}
