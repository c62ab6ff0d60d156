//! The two directions of a session, and state kept per direction or per
//! socket, indexed by them so no caller counts 0 and 1.

use std::ops::{Index, IndexMut};

use proxy_common::session::{DIRECTION_DOWN, DIRECTION_UP};

use crate::datapath::watcher::Side;

/// A direction of the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dir {
    /// Client to upstream.
    Up,
    /// Upstream to client.
    Down,
}

impl Dir {
    pub const ALL: [Self; 2] = [Self::Up, Self::Down];

    /// The direction whose bytes come from `side`.
    pub const fn from_source(side: Side) -> Self {
        match side {
            Side::Client => Self::Up,
            Side::Upstream => Self::Down,
        }
    }

    /// The socket this direction reads from.
    pub const fn source(self) -> Side {
        match self {
            Self::Up => Side::Client,
            Self::Down => Side::Upstream,
        }
    }

    /// The socket this direction writes to.
    pub const fn peer(self) -> Side {
        match self {
            Self::Up => Side::Upstream,
            Self::Down => Side::Client,
        }
    }

    /// The direction's number in the maps shared with the verdict program.
    pub const fn wire(self) -> u32 {
        match self {
            Self::Up => DIRECTION_UP,
            Self::Down => DIRECTION_DOWN,
        }
    }
}

/// One value per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct PerDir<T> {
    pub up: T,
    pub down: T,
}

impl<T> PerDir<T> {
    pub const fn new(up: T, down: T) -> Self {
        Self { up, down }
    }

    pub fn from_fn(mut f: impl FnMut(Dir) -> T) -> Self {
        Self {
            up: f(Dir::Up),
            down: f(Dir::Down),
        }
    }

    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> PerDir<U> {
        PerDir {
            up: f(self.up),
            down: f(self.down),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        [&self.up, &self.down].into_iter()
    }
}

impl<T> Index<Dir> for PerDir<T> {
    type Output = T;

    fn index(&self, dir: Dir) -> &T {
        match dir {
            Dir::Up => &self.up,
            Dir::Down => &self.down,
        }
    }
}

impl<T> IndexMut<Dir> for PerDir<T> {
    fn index_mut(&mut self, dir: Dir) -> &mut T {
        match dir {
            Dir::Up => &mut self.up,
            Dir::Down => &mut self.down,
        }
    }
}

/// One value per socket of the session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct PerSide<T> {
    pub client: T,
    pub upstream: T,
}

impl<T> PerSide<T> {
    pub const fn new(client: T, upstream: T) -> Self {
        Self { client, upstream }
    }
}

impl<T> Index<Side> for PerSide<T> {
    type Output = T;

    fn index(&self, side: Side) -> &T {
        match side {
            Side::Client => &self.client,
            Side::Upstream => &self.upstream,
        }
    }
}

impl<T> IndexMut<Side> for PerSide<T> {
    fn index_mut(&mut self, side: Side) -> &mut T {
        match side {
            Side::Client => &mut self.client,
            Side::Upstream => &mut self.upstream,
        }
    }
}
