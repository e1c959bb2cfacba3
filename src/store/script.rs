//! Lua scripts run on the shared store: sent by `EVALSHA`; a server that
//! does not know the script yet (a fresh or newly promoted primary, a
//! `SCRIPT FLUSH`) answers `NOSCRIPT`, and the call is sent again once as
//! `EVAL` with the source, which also caches it there. No `SCRIPT LOAD`,
//! which Redis Cluster would have to fan out to every node.

use redis::{Cmd, ToRedisArgs};

/// A Lua script with a name (its label in the store's metrics). Build it
/// once (a `static` behind `LazyLock`): the SHA-1 is computed here.
pub struct Script {
    name: &'static str,
    source: &'static str,
    sha1: String,
}

impl Script {
    /// `name` must be a short constant (`[a-z_]+`): it becomes a metric
    /// label.
    pub fn new(name: &'static str, source: &'static str) -> Self {
        Self {
            name,
            source,
            sha1: redis::Script::new(source).get_hash().to_owned(),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// An invocation on `keys`, which must all hash to one slot (Redis
    /// Cluster runs a script on one node): one key, or keys sharing a hash
    /// tag such as `app:{tenant-7}:a` and `app:{tenant-7}:b`. Add the
    /// arguments with [`Call::arg`].
    pub fn call<K: ToRedisArgs>(&self, keys: &[K]) -> Call<'_> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.sha1.as_str()).arg(keys.len()).arg(keys);
        Call { script: self, cmd }
    }
}

/// One invocation of a [`Script`], ready to run with
/// [`Store::run`](super::Store::run).
pub struct Call<'a> {
    script: &'a Script,
    /// `EVALSHA sha numkeys keys… args…`.
    cmd: Cmd,
}

impl Call<'_> {
    /// Appends `ARGV[n]`.
    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.cmd.arg(arg);
        self
    }

    pub fn script(&self) -> &Script {
        self.script
    }

    pub(super) fn evalsha(&self) -> &Cmd {
        &self.cmd
    }

    /// The same invocation with the script's source: the `NOSCRIPT`
    /// fallback, rare, so built only then.
    pub(super) fn eval(&self) -> Cmd {
        let mut eval = redis::cmd("EVAL");
        eval.arg(self.script.source);
        for arg in self.cmd.args_iter().skip(2) {
            if let redis::Arg::Simple(bytes) = arg {
                eval.arg(bytes);
            }
        }
        eval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_evalsha_and_falls_back_to_eval_with_the_same_keys_and_arguments() {
        let script = Script::new("test_incr", "return redis.call('INCRBY', KEYS[1], ARGV[1])");
        let mut call = script.call(&[&b"k:{t}:1"[..]]);
        call.arg(5).arg(&b"x"[..]);
        let evalsha = call.evalsha().get_packed_command();
        let expected = format!(
            "*6\r\n$7\r\nEVALSHA\r\n$40\r\n{}\r\n$1\r\n1\r\n$7\r\nk:{{t}}:1\r\n$1\r\n5\r\n$1\r\nx\r\n",
            redis::Script::new(script.source).get_hash()
        );
        assert_eq!(String::from_utf8(evalsha).unwrap(), expected);
        let eval = String::from_utf8(call.eval().get_packed_command()).unwrap();
        assert!(
            eval.starts_with("*6\r\n$4\r\nEVAL\r\n$45\r\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])\r\n$1\r\n1\r\n$7\r\nk:{t}:1\r\n"),
            "{eval}"
        );
        assert_eq!(script.name(), "test_incr");
    }
}
