;; A reward script written by hand in WebAssembly text.
;;
;; Score: 1.0 when the completion's last non-whitespace character is '.',
;; '!' or '?' (it ends a sentence), else 0.0.
;;
;;   oxtune plugins --plugin examples/wasm-rewards/sentence_end.wat
;;
;; The interface (see the README, "Reward scripts"): export `memory`,
;; `oxtune_alloc(len) -> ptr` and
;; `oxtune_reward(prompt_ptr, prompt_len, completion_ptr, completion_len,
;;                columns_ptr, columns_len) -> f64`.
(module
  (memory (export "memory") 1)
  ;; A bump allocator; every sample runs in a fresh instance.
  (global $heap (mut i32) (i32.const 1024))

  (func (export "oxtune_alloc") (param $len i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (block $fits
      (loop $grow
        (br_if $fits
          (i32.le_u (i32.add (local.get $ptr) (local.get $len))
                    (i32.mul (memory.size) (i32.const 65536))))
        (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1))
          (then unreachable))
        (br $grow)))
    (global.set $heap (i32.add (local.get $ptr) (local.get $len)))
    (local.get $ptr))

  (func $is_space (param $c i32) (result i32)
    (i32.or
      (i32.or (i32.eq (local.get $c) (i32.const 32)) (i32.eq (local.get $c) (i32.const 9)))
      (i32.or (i32.eq (local.get $c) (i32.const 10)) (i32.eq (local.get $c) (i32.const 13)))))

  (func (export "oxtune_reward")
    (param $prompt i32) (param $prompt_len i32)
    (param $completion i32) (param $completion_len i32)
    (param $columns i32) (param $columns_len i32)
    (result f64)
    (local $i i32)
    (local $c i32)
    (local.set $i (local.get $completion_len))
    (block $empty
      (loop $scan
        (br_if $empty (i32.eqz (local.get $i)))
        (local.set $i (i32.sub (local.get $i) (i32.const 1)))
        (local.set $c (i32.load8_u (i32.add (local.get $completion) (local.get $i))))
        (br_if $scan (call $is_space (local.get $c)))
        (return
          (select (f64.const 1) (f64.const 0)
            (i32.or
              (i32.or (i32.eq (local.get $c) (i32.const 46)) (i32.eq (local.get $c) (i32.const 33)))
              (i32.eq (local.get $c) (i32.const 63)))))))
    (f64.const 0))
)
