//! The native stack left to the thread evaluating a script. Each script call level takes
//! native stack, and overflowing it aborts the process; the engine stops a script whose stack
//! runs low as a safety limit ("too many call levels") instead, whatever `--max-call-levels` says.

use std::cell::Cell;

/// Stack kept free below the deepest script level: host functions called there need some.
pub const RESERVE: usize = 256 << 10;

/// The stack `lpo` runs scripts on (the main thread's 8 MiB holds only a few hundred levels).
pub const SCRIPT_THREAD_STACK: usize = 512 << 20;

thread_local! {
    /// The lowest usable address of this thread's stack (0: unknown).
    static STACK_LOW: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Bytes of stack left below the caller's frame, when the platform tells the stack's bounds.
pub fn remaining() -> Option<usize> {
    let marker = 0u8;
    let here = std::hint::black_box(&marker) as *const u8 as usize;
    let low = STACK_LOW.with(|cell| {
        if cell.get().is_none() {
            cell.set(Some(stack_low().unwrap_or(0)));
        }
        cell.get().unwrap_or(0)
    });
    (low != 0).then(|| here.saturating_sub(low))
}

/// True when a script at this depth should stop before the stack overflows.
pub fn exhausted() -> bool {
    remaining().is_some_and(|left| left < RESERVE)
}

#[cfg(target_os = "linux")]
fn stack_low() -> Option<usize> {
    // SAFETY: pthread_getattr_np fills `attr` for the calling thread; it is read and destroyed
    // here and nothing else refers to it.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return None;
        }
        let mut addr: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let mut guard: libc::size_t = 0;
        let ok = libc::pthread_attr_getstack(&attr, &mut addr, &mut size) == 0;
        libc::pthread_attr_getguardsize(&attr, &mut guard);
        libc::pthread_attr_destroy(&mut attr);
        (ok && !addr.is_null()).then(|| addr as usize + guard)
    }
}

#[cfg(not(target_os = "linux"))]
fn stack_low() -> Option<usize> {
    None
}

/// The termination token of a script stopped for want of stack.
#[derive(Debug, Clone)]
pub struct StackExhausted;

impl StackExhausted {
    pub const MESSAGE: &'static str =
        "too many call levels: the native stack is nearly full at this depth (recurse less deeply)";
}

#[cfg(test)]
mod tests {
    #[test]
    fn remaining_shrinks_with_depth() {
        fn depth(n: usize) -> usize {
            let pad = std::hint::black_box([0u8; 4096]);
            if n == 0 {
                super::remaining().unwrap() + pad[0] as usize
            } else {
                depth(n - 1)
            }
        }
        let top = super::remaining().unwrap();
        let deep = depth(16);
        assert!(top > deep + 16 * 4096, "{top} vs {deep}");
    }
}
